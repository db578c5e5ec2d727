"""A selection far larger than the sample starts at once: its first chunks are in the queue while
the rest of it is still being recorded (the order of events, not a time: how soon is measured by
`python -m bench.selection`). The selection is sliced by id (SELECTION_SLICE_IDS, default
250,000) and its last slice made slow, so recording cannot end before the test has looked."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from common.jobs import job_progress
from tests.conftest import PrivateDatabase, run_cli
from tests.stack import BIN, Stack, wait_until

IDS = 1_000_000
SLOW_AFTER = """
CREATE FUNCTION slow_after(bigint, bigint) RETURNS boolean STABLE LANGUAGE sql
AS 'SELECT $1 <= $2 OR pg_sleep(0.02) IS NOT NULL'
"""
SELECTION = f"SELECT id FROM synthetic_ids WHERE slow_after(id, {IDS - 100_000})"


@pytest.fixture
def stack(private_database: PrivateDatabase, tmp_path: Path) -> Iterator[Stack]:
    """The sample's database with a dataset of a million ids (no images: nothing reads them), a
    broker of its own and a dispatcher; no pools."""
    with private_database("first_chunks") as env:
        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f"CREATE TABLE synthetic_ids AS SELECT generate_series(1, {IDS})::bigint AS id")
            conn.execute("GRANT SELECT ON synthetic_ids TO quarry_reader")  # selections run as that role
            conn.execute(
                "INSERT INTO datasets (name, id_column, format) VALUES ('synthetic_ids', 'id', 'kaggle')"
            )
            conn.execute(SLOW_AFTER)
        stack = Stack(env, tmp_path / "stack")
        try:
            stack.start_redis()
            stack.start_dispatcher()
            yield stack
        finally:
            stack.stop_all()


def first_dispatched(stack: Stack) -> tuple[str, str, int] | None:
    """(job, its state, chunks dispatched) once a chunk of a job was dispatched."""
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        found = conn.execute(
            "SELECT job_id::text, count(*) FROM job_chunks WHERE dispatches > 0 GROUP BY 1"
        ).fetchone()
        if found is None:
            return None
        progress = job_progress(conn, found[0])
        assert progress is not None
        return found[0], progress.state, found[1]


def test_the_first_chunks_are_queued_while_the_selection_is_still_recorded(stack: Stack) -> None:
    producer = subprocess.Popen(
        [str(BIN / "producer"), "run", "--query", SELECTION, "--dataset", "synthetic_ids"],
        env={**os.environ, **stack.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # the dispatcher records a chunk's dispatch, then publishes its message: wait for both
        wait_until(lambda: first_dispatched(stack), 120, "a chunk of the selection to be dispatched")
        wait_until(lambda: stack.redis().llen("transform") > 0, 120, "a chunk's message in the queue")
        job_id, state, dispatched = first_dispatched(stack)  # type: ignore[misc]
        assert state == "recording" and producer.poll() is None  # the selection is not all read yet
        assert dispatched > 0
        assert run_cli("cancel", job_id, env=stack.env).stdout.strip() == f"job {job_id}: cancelled"
    finally:
        producer.kill()
        producer.communicate(timeout=30)
