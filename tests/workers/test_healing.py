"""Healing without waiting for a lease: a worker process lost while it holds a chunk, or a message
lost with the broker, has its chunk sent again by the dispatcher's liveness check (the lease is an
hour here, so it cannot be the lease running out); a pool sent SIGTERM hands everything on; an
image that kills its worker fails alone. How soon (30 s with the default settings) is measured by
`python -m bench.faults`, not asserted here."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import psycopg
import psycopg.sql
import pytest

from tests.conftest import WITH_IMAGES, PrivateDatabase, run_cli
from tests.stack import Stack, wait_until

IMAGES = 295  # stored images of the vendored sample
JOB = ("--augment", "hflip | rotate(limit=15) | resize(224, 224)", "--variants", "2", "--chunk-size", "10")
LEASE_S = "3600"  # no chunk's lease runs out during a test: only the liveness check sends again


@pytest.fixture(scope="module")
def heal_env(private_database: PrivateDatabase) -> Iterator[dict[str, str]]:
    """A database of its own (the session's dispatcher must not see these jobs), ingested; every
    setting of the ledger at its default but the lease."""
    with private_database("heal", CHUNK_LEASE_S=LEASE_S) as env:
        yield env


@pytest.fixture
def stack(heal_env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(heal_env, tmp_path / "stack")
    stack.start_own()
    yield stack
    stack.stop_all()


def held(stack: Stack) -> set[tuple[str, int]]:
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        return {(str(job), chunk) for job, chunk in conn.execute("SELECT job_id, chunk_index FROM holds")}


@pytest.mark.parametrize("queue", ["transform", "upload", "inference"])
def test_a_pool_killed_holding_a_chunk_has_it_sent_again_by_the_liveness_check(
    stack: Stack, queue: str
) -> None:
    job_id = stack.submit(WITH_IMAGES, *JOB, "--model", "default")
    tickets = stack.kill_pool_mid_chunk(queue)
    lost = {(str(t["job_id"]), int(t["chunk"])): int(t["dispatch"]) for t in tickets}  # type: ignore[call-overload]
    stack.start_pool(queue)  # as its supervisor would
    stack.wait_sent_again(lost)
    stack.assert_finished_cleanly(job_id, IMAGES * 2)


def test_a_broker_restarted_empty_has_every_lost_chunk_sent_again_by_the_liveness_check(stack: Stack) -> None:
    job_id = stack.submit(WITH_IMAGES, *JOB, "--model", "default")
    wait_until(lambda: stack.progress(job_id).done >= 40, 120, "40 items")
    pools = [name for name in stack.processes if name.startswith("worker-")]
    for name in pools:  # frozen: what they hold stays held, what is queued stays queued
        stack.send_signal(name, signal.SIGSTOP)

    def queued() -> dict[tuple[str, int], int]:
        holding = held(stack)
        sent = stack.chunk_dispatches()
        return {
            key: count for key, (state, count) in sent.items() if state == "dispatched" and key not in holding
        }

    wait_until(queued, 60, "a dispatched chunk no pool holds")  # the dispatcher fills the queues
    stack.stop("redis", signal.SIGKILL)  # no persistence: every queued message is gone
    lost = queued()  # no message can be taken now
    stack.start_redis()
    for name in pools:
        stack.send_signal(name, signal.SIGCONT)
    stack.wait_sent_again(lost)
    stack.assert_finished_cleanly(job_id, IMAGES * 2)


def test_a_pool_sent_sigterm_hands_everything_on_and_nothing_waits(stack: Stack) -> None:
    job_id = stack.submit(WITH_IMAGES, *JOB)
    wait_until(lambda: stack.progress(job_id).done >= 40, 120, "40 items")
    stack.terminate("worker-transform")  # a warm shutdown: its running tasks finish first
    stack.start_pool("transform")
    stack.assert_finished_cleanly(job_id, IMAGES * 2)
    assert stack.redispatched(job_id) == 0  # nothing was lost: no chunk was sent twice


POISON = 6  # the image of the poison dataset that "kills its worker"


@pytest.fixture
def poison_dataset(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """A folder of 12 small images, ingested as dataset `poison`."""
    folder = tmp_path / "poison"
    folder.mkdir()
    small = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for image_id in range(1, 13):
        cv2.imwrite(
            str(folder / f"{image_id}.jpg"), cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR)
        )
    run_cli("ingest", str(folder), "--dataset", "poison", env=stack.env)
    yield "poison"
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("DROP TABLE poison")
        conn.execute("DELETE FROM datasets WHERE name = 'poison'")


def test_an_image_that_kills_its_worker_fails_alone_after_the_last_attempt(
    stack: Stack, poison_dataset: str
) -> None:
    """The worker dies while rendering one image, on every attempt (SIGKILLed by the test while
    it holds that image's chunk, and on the careful retry the moment that image is the one marked
    as being rendered): on the last of CHUNK_MAX_ATTEMPTS that image's items fail with one line,
    unrendered, and every other item of its chunk is done."""
    job_id = stack.submit(
        "SELECT id FROM poison",
        "--dataset",
        "poison",
        "--variants",
        "2",
        "--augment",
        "resize(224, 224)",
        "--chunk-size",
        "12",
    )
    kill_transform_holding(stack, job_id, 0)  # attempt 1 renders without marking images
    stack.start_pool("transform")  # as its supervisor would
    kill_transform_past(stack, job_id, 0, POISON)  # attempt 2, careful, marks each image first
    stack.start_pool("transform")
    wait_until(lambda: stack.progress(job_id).ended, 120, "the job to end", interval=0.5)
    final = stack.progress(job_id)
    assert (final.state, final.done, final.failed) == ("finished", 22, 2), stack.logs()
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        failures = conn.execute(
            "SELECT image_id, error FROM job_items WHERE job_id = %s AND status = 'failed'", (job_id,)
        ).fetchall()
    assert (
        failures
        == [
            (
                POISON,
                "transform: its worker process was lost while rendering this image (2 of 3 attempts);"
                " not tried again",
            )
        ]
        * 2
    )


def kill_transform_holding(stack: Stack, job_id: str, chunk: int) -> None:
    """SIGKILL the transform pool once it holds `chunk`, frozen first so that it cannot finish it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stack.send_signal("worker-transform", signal.SIGSTOP)
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            row = conn.execute(
                """SELECT 1 FROM job_chunks c JOIN holds h USING (job_id, chunk_index)
                   WHERE c.job_id = %s AND c.chunk_index = %s AND c.state = 'dispatched'""",
                (job_id, chunk),
            ).fetchone()
        if row is not None:
            stack.stop("worker-transform", signal.SIGKILL)
            return
        stack.send_signal("worker-transform", signal.SIGCONT)
        time.sleep(0.01)
    raise TimeoutError(f"the transform pool never held chunk {chunk}")


GATE = 20_906  # the advisory lock that `kill_transform_past` keeps a pool waiting on


def kill_transform_past(stack: Stack, job_id: str, chunk: int, image_id: int) -> None:
    """SIGKILL the transform pool while `image_id` is the image its careful retry of `chunk` has
    marked as being rendered: a trigger (in this module's own database) keeps the pool's next
    change of that mark (to the next image, or cleared) waiting on an advisory lock the test
    holds, so the pool cannot get past `image_id` however fast it renders; the waiting session
    is ended with the pool, so the mark stays. (Freezing and polling, as for the first kill,
    missed a render of a few milliseconds under load.)"""
    when = psycopg.sql.SQL(
        "OLD.job_id = {} AND OLD.chunk_index = {} AND OLD.rendering = {}"
        " AND NEW.rendering IS DISTINCT FROM OLD.rendering"
    ).format(psycopg.sql.Literal(job_id), psycopg.sql.Literal(chunk), psycopg.sql.Literal(image_id))
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        conn.execute(
            psycopg.sql.SQL(
                """CREATE FUNCTION wait_at_gate() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
                   AS $$ BEGIN PERFORM pg_advisory_xact_lock({gate}); RETURN NEW; END $$;
                   CREATE TRIGGER gate BEFORE UPDATE ON job_chunks FOR EACH ROW WHEN ({when})
                   EXECUTE FUNCTION wait_at_gate()"""
            ).format(gate=psycopg.sql.Literal(GATE), when=when)
        )
        try:
            waiting: list[int] = []

            def pool_waits_at_gate() -> bool:
                waiting[:] = [
                    row[0]
                    for row in conn.execute(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND NOT granted",
                        (GATE,),
                    )
                ]
                return bool(waiting)

            wait_until(
                pool_waits_at_gate, 120, f"the transform pool to render image {image_id} of chunk {chunk}"
            )
            stack.stop("worker-transform", signal.SIGKILL)
            for pid in waiting:  # (the timeout: return once it has ended, before the gate opens)
                assert conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() == (True,)
        finally:
            conn.execute("DROP TRIGGER gate ON job_chunks; DROP FUNCTION wait_at_gate()")
            conn.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
        marked = conn.execute(
            "SELECT rendering FROM job_chunks WHERE job_id = %s AND chunk_index = %s", (job_id, chunk)
        ).fetchone()
        assert marked == (image_id,), marked
