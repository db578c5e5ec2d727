"""Healing without waiting for a lease: a worker process lost while it holds a chunk, or a message
lost with the broker, has its chunk sent again by the dispatcher's liveness check (the lease is an
hour here, so it cannot be the lease running out); a pool sent SIGTERM hands everything on; an
image that kills its worker fails alone. How soon (30 s with the default settings) is measured by
`python -m bench.faults`, not asserted here."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import psycopg
import psycopg.sql
import pytest

from common.config import Settings
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
    """The worker dies on every attempt (SIGKILLed by the test while it holds the chunk, and on
    the careful retry while the poison image is the one marked as being rendered): on the last of
    CHUNK_MAX_ATTEMPTS that image's items fail with one line, unrendered, and every other item
    of its chunk is done. The pool is stopped at each point by a lock the test holds (a gate),
    not caught there by freezing and polling: under load a poll misses a point that lasts
    milliseconds, and a pool caught after it handed its chunk on is not a lost chunk."""
    url = stack.env["DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as marks, gate_past_mark(marks, POISON):
        with psycopg.connect(url) as reads:  # in a transaction: the lock holds until it ends
            reads.execute("LOCK TABLE locations IN ACCESS EXCLUSIVE MODE")
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
            # attempt 1: counted, its chunk held, stopped before it reads where its images are
            kill_transform_stopped_by(stack, reads)
        stack.start_pool("transform")  # as its supervisor would
        kill_transform_stopped_by(stack, marks)  # attempt 2, careful: stopped past the poison image
        marked = marks.execute("SELECT rendering FROM job_chunks WHERE job_id = %s", (job_id,)).fetchone()
        assert marked == (POISON,), marked
    stack.start_pool("transform")
    wait_until(lambda: stack.progress(job_id).ended, 120, "the job to end", interval=0.5)
    final = stack.progress(job_id)
    assert (final.state, final.done, final.failed) == ("finished", 22, 2), stack.logs()
    with psycopg.connect(url) as conn:
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


GATE = 20_906  # the advisory lock `gate_past_mark` keeps a pool waiting on


@contextmanager
def gate_past_mark(conn: psycopg.Connection, image_id: int) -> Iterator[None]:
    """While open, a pool that has marked `image_id` as the one it is rendering cannot change that
    mark (to the next image, or cleared): a trigger (in this module's own database) makes the
    change wait on an advisory lock that `conn` holds."""
    conn.execute("SELECT pg_advisory_lock(%s)", (GATE,))
    conn.execute(
        psycopg.sql.SQL(
            """CREATE FUNCTION wait_at_gate() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
               AS $$ BEGIN PERFORM pg_advisory_xact_lock({gate}); RETURN NEW; END $$;
               CREATE TRIGGER gate BEFORE UPDATE ON job_chunks FOR EACH ROW
               WHEN (OLD.rendering = {image} AND NEW.rendering IS DISTINCT FROM OLD.rendering)
               EXECUTE FUNCTION wait_at_gate()"""
        ).format(gate=psycopg.sql.Literal(GATE), image=psycopg.sql.Literal(image_id))
    )
    try:
        yield
    finally:
        conn.execute("DROP TRIGGER gate ON job_chunks; DROP FUNCTION wait_at_gate()")
        conn.execute("SELECT pg_advisory_unlock(%s)", (GATE,))


def kill_transform_stopped_by(stack: Stack, gate: psycopg.Connection) -> None:
    """SIGKILL the transform pool once one of its sessions waits on a lock `gate` holds, and end
    that session before the lock is let go (so that its statement never runs)."""
    worker_role = Settings(database_url=stack.env["DATABASE_URL"]).worker_role
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        waiting: list[int] = []

        def pool_waits() -> bool:
            waiting[:] = [
                row[0]
                for row in conn.execute(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE usename = %s AND %s = ANY (pg_blocking_pids(pid))",
                    (worker_role, gate.info.backend_pid),
                )
            ]
            return bool(waiting)

        wait_until(pool_waits, 120, "the transform pool to wait at the gate")
        stack.stop("worker-transform", signal.SIGKILL)
        for pid in waiting:  # the timeout: return once the session has ended
            assert conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() == (True,)
