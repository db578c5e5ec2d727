"""One job across worker nodes: `deploy/local/stack.sh node-up NAME` sets of pools on the same
PostgreSQL, Redis and S3. Each node does part of the job; a node SIGKILLed whole mid-job leaves
the job to the others (the chunks its processes held are sent again by the dispatcher's liveness
check: the lease here is an hour, so not by a lease running out; one the lost process had just
handed on to another node's stage may finish there instead), and a node started mid-job takes
work. Who did what is counted from each node's own worker logs (Celery's "succeeded" line per
task)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.conftest import WITH_IMAGES, PrivateDatabase
from tests.stack import Stack, wait_until

JOB = ("--augment", "hflip | rotate(limit=15)", "--variants", "4", "--chunk-size", "5", "--model", "default")
ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "deploy" / "local" / "stack.sh"


@pytest.fixture
def cluster(private_database: PrivateDatabase, tmp_path: Path) -> Iterator[Stack]:
    """A database of its own (ingested), a private redis-server and a dispatcher; no pools."""
    settings = {
        "CHUNK_LEASE_S": "3600",  # only the liveness check can send a lost chunk again
        "DISPATCH_INTERVAL_S": "0.2",
        "QUARRY_RUN_DIR": str(tmp_path / "run"),
        "TRANSFORM_CONCURRENCY": "1",
        "UPLOAD_CONCURRENCY": "4",
    }
    with private_database("nodes", **settings) as env:
        stack = Stack(env, tmp_path / "stack")
        stack.start_redis()
        stack.start_dispatcher()
        yield stack
        for node in ("a", "b", "c"):
            kill_node(stack, node)
        stack.stop_all()


def node_dir(stack: Stack, node: str) -> Path:
    return Path(stack.env["QUARRY_RUN_DIR"]) / "nodes" / node


def node_up(stack: Stack, node: str) -> None:
    subprocess.run(
        [str(STACK_SH), "node-up", node], env={**os.environ, **stack.env}, check=True, timeout=120, cwd=ROOT
    )


def node_processes(stack: Stack, node: str) -> list[psutil.Process]:
    """Each pool's main process of the node and its children."""
    processes = []
    for pid_file in node_dir(stack, node).glob("*.pid"):
        try:
            main = psutil.Process(int(pid_file.read_text()))
            processes += [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return processes


def chunks_held_by(stack: Stack, pids: set[int]) -> dict[tuple[str, int], int]:
    """(job, chunk) -> dispatches, of the unfinished chunks processes of `pids` hold (a holder is
    named host:pid:random)."""
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        rows = conn.execute(
            """SELECT h.holder, c.job_id::text, c.chunk_index, c.dispatches
               FROM holds h JOIN job_chunks c USING (job_id, chunk_index) WHERE c.state = 'dispatched'"""
        ).fetchall()
    return {(job, chunk): count for holder, job, chunk, count in rows if int(holder.split(":")[1]) in pids}


def freeze_holding(stack: Stack, node: str, timeout: float = 120) -> dict[tuple[str, int], int]:
    """Freeze the node's processes (SIGSTOP) at a moment they hold an unfinished chunk, so that
    they can neither record nor take a task; what they hold. An idle node is thawed and looked
    at again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes = node_processes(stack, node)
        for process in processes:
            process.send_signal(signal.SIGSTOP)
        held = chunks_held_by(stack, {process.pid for process in processes})
        if held:
            return held
        for process in processes:
            process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise TimeoutError(f"node {node} held no unfinished chunk in {timeout} s")


def kill_node(stack: Stack, node: str) -> None:
    """SIGKILL every process of the node at once: each pool's main process and its children."""
    processes = node_processes(stack, node)
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(processes, timeout=10)


def tasks_done(stack: Stack, node: str) -> int:
    """Tasks the node's pools finished, from their logs."""
    return sum(
        log.read_text(errors="replace").count(" succeeded in ") for log in node_dir(stack, node).glob("*.log")
    )


def test_a_job_runs_on_three_nodes_one_killed_one_started_mid_job(cluster: Stack) -> None:
    node_up(cluster, "a")
    node_up(cluster, "b")
    job_id = cluster.submit(WITH_IMAGES, *JOB)
    wait_until(
        lambda: tasks_done(cluster, "a") > 0 and tasks_done(cluster, "b") > 0, 120, "both nodes at work"
    )
    assert not cluster.progress(job_id).ended, "the job ended before the fault: make it bigger"
    held = freeze_holding(cluster, "a")
    kill_node(cluster, "a")
    node_up(cluster, "c")
    cluster.wait_sent_again(held)
    wait_until(lambda: cluster.progress(job_id).ended, 300, "the job to finish")
    final = cluster.progress(job_id)
    assert (final.state, final.failed, final.done) == ("finished", 0, final.total)
    done_by = {node: tasks_done(cluster, node) for node in ("a", "b", "c")}
    print(f"tasks done by node: {done_by}; re-dispatched chunks: {cluster.redispatched(job_id)}")
    assert all(count > 0 for count in done_by.values()), done_by
