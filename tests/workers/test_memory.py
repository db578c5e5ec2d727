"""The dispatcher's, the upload pool's and the inference pool's memory does not grow with a job's
size: the peak resident memory of each (a pool with its child processes) while a job of 1,180
items runs is within a fixed margin of its peak during a job of 160 of the same shape, both
after a warm-up job of that shape (the model loaded, its buffers sized to the batch). Memory per
image at scale is bench/'s."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import WITH_IMAGES, PrivateDatabase
from tests.stack import Stack

MIB = 1024 * 1024
MARGIN_MIB = 64  # the allocator's and onnxruntime's own noise; a job 30 times larger may not add more
WATCHED = ("dispatcher", "worker-upload", "worker-inference")
# the same job shape (chunks, batches, variants), 40 images against the sample's 295: each item
# new to the model (4 variants of the augmented image), so the model runs on every one
SHAPE = ("--augment", "hflip | rotate(limit=20) | resize(64, 64)", "--variants", "4", "--model", "default")
WARM_UP = (f"{WITH_IMAGES} ORDER BY s.id LIMIT 40", *SHAPE)
SMALL = (f"{WITH_IMAGES} ORDER BY s.id DESC LIMIT 40", *SHAPE)
LARGE = (WITH_IMAGES, *SHAPE, "--seed", "7")


@pytest.fixture
def stack(private_database: PrivateDatabase, tmp_path: Path) -> Iterator[Stack]:
    with private_database("memory") as env:
        stack = Stack(env, tmp_path / "stack")
        try:
            stack.start_own()
            yield stack
        finally:
            stack.stop_all()


def resident(pid: int) -> int:
    """Resident bytes of a process and its children."""
    main = psutil.Process(pid)
    return sum(process.memory_info().rss for process in [main, *main.children(recursive=True)])


def peaks_while(stack: Stack, query: str, *args: str) -> dict[str, int]:
    """Run a job to its end, sampling each watched process's resident memory; the peaks."""
    pids = {name: stack.processes[name].pid for name in WATCHED}
    peaks = dict.fromkeys(WATCHED, 0)
    samples = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            for name, pid in pids.items():
                peaks[name] = max(peaks[name], resident(pid))
            samples[0] += 1

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        job_id = stack.submit(query, *args)
        final = stack.wait_ended(job_id)
    finally:
        done.set()
        sampler.join()
    assert final.state == "finished" and final.failed == 0, stack.logs()
    assert samples[0] > 0
    return peaks


def test_memory_does_not_grow_with_the_jobs_size(stack: Stack) -> None:
    peaks_while(stack, *WARM_UP)  # the model loaded and its buffers sized, connections and caches made
    small = peaks_while(stack, *SMALL)
    large = peaks_while(stack, *LARGE)
    print({name: (small[name] // MIB, large[name] // MIB) for name in WATCHED})
    for name in WATCHED:
        assert large[name] <= small[name] + MARGIN_MIB * MIB, (name, small[name] // MIB, large[name] // MIB)
