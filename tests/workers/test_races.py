"""Commands racing the pools on the same rows: cancel and retry while chunks finish, through the
real CLI, pools and dispatcher. No deadlock, no traceback, no count out of step."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from common.errors import UserError
from quarry import Quarry
from tests.conftest import WITH_IMAGES, PrivateDatabase, run_cli
from tests.postgres import deadlocks
from tests.stack import wait_until

pytestmark = pytest.mark.usefixtures("workers")
ROUNDS = 40
# a chunk per image, so chunks finish (and lock the job's counters) many times a second
JOB = ("--chunk-size", "1", "--augment", "resize(32, 32)")


def command(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = run_cli(*args, env=env, check=False)
    return result.returncode, result.stderr


def bitmap_mismatches(conn: psycopg.Connection, job_id: str) -> list[tuple[object, ...]]:
    """Rows where the job's counters differ from what its chunks' bitmaps say."""
    return conn.execute(
        """
        WITH c AS (
            SELECT sum(bit_count(coalesce(done_mask, B''))) FILTER (WHERE state = 'finished') AS done,
                   sum(bit_count(coalesce(failed_mask, B''))) FILTER (WHERE state = 'finished') AS failed,
                   bool_and(done = bit_count(coalesce(done_mask, B''))
                            AND failed = bit_count(coalesce(failed_mask, B''))) AS chunks_agree
            FROM job_chunks WHERE job_id = %(job)s
        )
        SELECT j.done, j.failed, c.done, c.failed, c.chunks_agree FROM jobs j, c
        WHERE j.id = %(job)s AND NOT (j.done = c.done AND j.failed = c.failed AND c.chunks_agree)
        """,
        {"job": job_id},
    ).fetchall()


def cancel_and_retry(env: dict[str, str], job_id: str, rounds: int, seed: int) -> list[tuple[str, int, str]]:
    """`rounds` times: cancel, let some chunks finish, retry; every fifth round through the CLI,
    the others through the Python API (faster, so the commands meet far more finishing chunks)."""
    quarry = Quarry.from_env()  # the test session's environment is `env`
    rng = random.Random(seed)
    outcomes = []
    for round_ in range(rounds):
        for verb in ("cancel", "retry"):
            if round_ % 5 == 0:
                outcomes.append((f"{verb} {job_id}", *command(env, verb, job_id)))
            else:
                try:
                    getattr(quarry.job(job_id), verb)()
                    outcomes.append((f"{verb} {job_id} (API)", 0, ""))
                except UserError as exc:  # retry of a job already running again: refused
                    outcomes.append((f"{verb} {job_id} (API)", 2, f"error: {exc}"))
            time.sleep(rng.uniform(0.02, 0.3))  # chunks are claimed and finish in between
    return outcomes


def test_cancel_and_retry_while_chunks_finish_never_deadlock(ingested, db: psycopg.Connection) -> None:
    before = deadlocks(db)
    jobs = [run_cli("run", "--query", WITH_IMAGES, *JOB, env=ingested).stdout.split()[-1] for _ in range(2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = pool.map(
            lambda args: cancel_and_retry(ingested, *args), [(j, ROUNDS, n) for n, j in enumerate(jobs)]
        )
        outcomes = [outcome for run in runs for outcome in run]

    for name, code, err in outcomes:
        # 0, or a one-line refusal (retry of a job that is running again already)
        assert code in (0, 2), (name, code, err)
        assert code == 0 or (len(err.strip().splitlines()) == 1 and err.startswith("error: ")), (name, err)
    assert sum(code == 0 for _, code, _ in outcomes) >= ROUNDS  # the race really happened
    run_cli("retry", jobs[0], env=ingested, check=False)  # the last cancel may have been refused
    run_cli("retry", jobs[1], env=ingested, check=False)

    def finished(job_id: str) -> bool:
        return db.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()[0] == "finished"

    for job_id in jobs:
        wait_until(lambda j=job_id: finished(j), 120, f"job {job_id} to finish")
        assert bitmap_mismatches(db, job_id) == []
        done, failed, total = db.execute(
            "SELECT done, failed, total FROM jobs WHERE id = %s", (job_id,)
        ).fetchone()
        assert (done, failed) == (total, 0)
    assert deadlocks(db) == before


def test_a_command_kept_from_its_lock_fails_in_one_line(private_database: PrivateDatabase) -> None:
    """Another session holds the job's row (an operator's open transaction): `producer cancel`
    waits LOCK_TIMEOUT per try, tries again for 30 s, then says so in one line, exit 1. (In a
    database of its own, which no pool serves: the job is still running when the lock is let go,
    however long the tries took.)"""
    with private_database("kept") as env:
        job_id = run_cli("run", "--query", WITH_IMAGES, *JOB, env=env).stdout.split()[-1]
        with psycopg.connect(env["DATABASE_URL"]) as holder:
            holder.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            result = run_cli("cancel", job_id, env=env, check=False)
            holder.rollback()
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: PostgreSQL: canceling statement due to lock timeout (")
        tries = int(lines[0].rsplit("(", 1)[1].removesuffix(" tries)"))
        assert tries > 1, lines[0]  # it tried again before giving up
        assert run_cli("cancel", job_id, env=env).stdout.strip() == f"job {job_id}: cancelled"
