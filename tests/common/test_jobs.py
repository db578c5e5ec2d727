"""The job ledger against a real PostgreSQL: recording, progress, stale messages, leases, retry.
On a database of this module's own: the session's dispatcher (tests/workers) must not dispatch
these jobs' chunks, whichever order the tests run in."""

import contextlib
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from common.config import Settings, get_settings
from common.db import Database, connect, ensure_schema
from common.errors import ConfigError, UnknownJob, UserError
from common.jobs import cancel_job, job_progress, retry_job
from common.jobspec import JobSpec
from common.ledger import (
    ItemResult,
    Ticket,
    claim_chunks,
    fail_exhausted,
    note_failure,
    open_chunk,
    record_progress,
    return_expired,
    touch,
    unclaim,
)
from producer.dispatch import RunningJob, allocate, claim
from quarry.submit import submit_job
from tests.conftest import PrivateDatabase
from tests.postgres import deadlocks

LEASE = 60


@pytest.fixture(scope="module")
def own_settings(private_database: PrivateDatabase) -> Iterator[Settings]:
    with private_database("jobs") as env:
        yield get_settings().model_copy(update={"database_url": env["DATABASE_URL"]})


@pytest.fixture
def settings(own_settings: Settings) -> Settings:
    return own_settings


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection]:
    """The module's database; its jobs removed after each test."""
    with connect(settings.database_url, autocommit=True) as conn:
        yield conn
        conn.execute("TRUNCATE jobs, job_chunks, job_items, ingest_units, recorded_batches")


def new_job(
    db: psycopg.Connection, chunks: list[list[int]], variants: int = 1, item_rows: str = "all"
) -> str:
    """Record a job whose query selects the ids of `chunks` (all but the last of one size)."""
    spec = JobSpec(job_id=str(uuid.uuid4()), variants=variants, item_rows=item_rows)  # type: ignore[arg-type]
    ids = ", ".join(str(i) for chunk in chunks for i in chunk) or "NULL"
    query = f"SELECT unnest(ARRAY[{ids}]::bigint[]) AS id"
    settings = get_settings().model_copy(update={"database_url": db.info.dsn})
    submit_job(db, settings, query, spec, len(chunks[0]) if chunks else 1)
    return spec.job_id


def done(image_id: int, slot: int, variant: int = 0) -> ItemResult:
    return ItemResult(image_id, variant, slot, "done", output_uri=f"s3://b/{image_id}-{variant}")


def failed(image_id: int, slot: int, error: str = "transform: no image") -> ItemResult:
    return ItemResult(image_id, 0, slot, "failed", error=error)


def counts(db: psycopg.Connection, job_id: str) -> tuple[str, int, int, int]:
    progress = job_progress(db, job_id)
    assert progress is not None
    return progress.state, progress.total, progress.done, progress.failed


def test_a_job_is_recorded_whole_with_its_totals(db: psycopg.Connection) -> None:
    job_id = new_job(db, [[1, 2], [3]], variants=2)
    assert counts(db, job_id) == ("running", 6, 0, 0)
    rows = db.execute(
        "SELECT chunk_index, image_ids, items, state FROM job_chunks WHERE job_id = %s ORDER BY 1", (job_id,)
    ).fetchall()
    assert rows == [(0, [1, 2], 4, "pending"), (1, [3], 2, "pending")]
    assert counts(db, new_job(db, [])) == ("finished", 0, 0, 0)


def test_results_recorded_twice_count_once_and_finish_the_job(db: psycopg.Connection) -> None:
    job_id = new_job(db, [[10, 11, 12]])
    assert claim_chunks(db, job_id, 5, LEASE) == [(0, 1)]
    ticket = Ticket(job_id, 0, 1)
    assert record_progress(db, ticket, [done(10, 0), failed(11, 1)], "all", LEASE)
    assert record_progress(db, ticket, [done(10, 0), failed(11, 1)], "all", LEASE)  # redelivered
    assert counts(db, job_id) == ("running", 3, 1, 1)  # in-flight counts show before the chunk ends
    assert record_progress(db, ticket, [done(12, 2), done(11, 1)], "all", LEASE)  # done beats failed
    assert counts(db, job_id) == ("finished", 3, 3, 0)
    assert not record_progress(db, ticket, [failed(12, 2)], "all", LEASE)  # stale: chunk finished
    assert counts(db, job_id) == ("finished", 3, 3, 0)
    statuses = db.execute("SELECT status, count(*) FROM job_items WHERE job_id = %s GROUP BY 1", (job_id,))
    assert dict(statuses.fetchall()) == {"done": 3}


def test_failures_only_keeps_rows_for_failed_items(db: psycopg.Connection) -> None:
    job_id = new_job(db, [[1, 2, 3]], item_rows="failures")
    claim_chunks(db, job_id, 1, LEASE)
    record_progress(db, Ticket(job_id, 0, 1), [done(1, 0), done(2, 1), failed(3, 2)], "failures", LEASE)
    assert counts(db, job_id) == ("finished", 3, 2, 1)
    rows = db.execute("SELECT image_id, status FROM job_items WHERE job_id = %s", (job_id,)).fetchall()
    assert rows == [(3, "failed")]


def test_the_first_message_read_runs_the_chunk_and_the_others_are_stale(db: psycopg.Connection) -> None:
    job_id = new_job(db, [[1]])
    claim_chunks(db, job_id, 1, LEASE)
    expire(db, job_id)  # still queued when its lease ran out: sent again
    return_expired(db, max_attempts=3)
    assert claim_chunks(db, job_id, 1, LEASE) == [(0, 2)]
    assert open_chunk(db, Ticket(job_id, 0, 1), LEASE) is not None  # the old message, read first, runs it
    assert open_chunk(db, Ticket(job_id, 0, 1), LEASE) is not None  # redelivered: goes on
    assert open_chunk(db, Ticket(job_id, 0, 2), LEASE) is None  # the re-send is dropped
    assert touch(db, Ticket(job_id, 0, 2), LEASE)  # later stages take any dispatch's work
    assert db.execute("SELECT attempts FROM job_chunks WHERE job_id = %s", (job_id,)).fetchone() == (1,)
    with pytest.raises(UnknownJob, match="is not in this worker's database"):
        touch(db, Ticket(str(uuid.uuid4()), 0, 1), LEASE)


def expire(db: psycopg.Connection, job_id: str) -> None:
    db.execute("UPDATE job_chunks SET lease_until = now() - interval '1 s' WHERE job_id = %s", (job_id,))


def test_an_expired_lease_returns_the_chunk_then_fails_it_after_the_last_attempt(
    db: psycopg.Connection,
) -> None:
    job_id = new_job(db, [[1, 2, 3]])
    assert claim_chunks(db, job_id, 1, LEASE) == [(0, 1)]
    expire(db, job_id)  # no worker took the message (a long queue, a lost broker): no attempt
    assert return_expired(db, max_attempts=2) == 1
    for dispatch in (2, 3):
        assert claim_chunks(db, job_id, 1, LEASE) == [(0, dispatch)]
        assert open_chunk(db, Ticket(job_id, 0, dispatch), LEASE) is not None
        assert open_chunk(db, Ticket(job_id, 0, dispatch), LEASE) is not None  # same dispatch: one attempt
        if dispatch == 2:
            record_progress(db, Ticket(job_id, 0, 2), [done(1, 0), failed(2, 1)], "all", LEASE)
        expire(db, job_id)
        assert return_expired(db, max_attempts=2) == (1 if dispatch == 2 else 0)
    assert db.execute("SELECT attempts FROM job_chunks WHERE job_id = %s", (job_id,)).fetchone() == (2,)
    note_failure(db, Ticket(job_id, 0, 3), "transform: KeyError: 'x'", True)
    assert fail_exhausted(db, max_attempts=2, lease_s=LEASE) == 1
    assert counts(db, job_id) == ("finished", 3, 1, 2)
    errors = dict(
        db.execute("SELECT image_id, error FROM job_items WHERE job_id = %s AND status = 'failed'", (job_id,))
    )
    assert errors == {2: "transform: no image", 3: "gave up after 2 attempts: transform: KeyError: 'x'"}


def test_retry_resets_only_failed_items_and_their_counts(db: psycopg.Connection) -> None:
    job_id = new_job(db, [[1, 2], [3, 4]])
    claim_chunks(db, job_id, 2, LEASE)
    with pytest.raises(UserError, match="still running"):
        retry_job(db, job_id)
    record_progress(db, Ticket(job_id, 0, 1), [done(1, 0), failed(2, 1)], "all", LEASE)
    record_progress(db, Ticket(job_id, 1, 1), [done(3, 0), done(4, 1)], "all", LEASE)
    assert counts(db, job_id) == ("finished", 4, 3, 1)
    assert retry_job(db, job_id) == (1, 1)
    assert counts(db, job_id) == ("running", 4, 2, 0)
    (chunk,) = [(c, a) for c, a in claim_chunks(db, job_id, 5, LEASE)]
    assert chunk == (0, 2)  # its second dispatch
    opened = open_chunk(db, Ticket(job_id, 0, 2), LEASE)
    assert opened is not None and opened.done == 0b01  # image 1 is not redone
    record_progress(db, Ticket(job_id, 0, 2), [done(2, 1)], "all", LEASE)
    assert counts(db, job_id) == ("finished", 4, 4, 0)


def test_cancel_stops_a_job_and_its_messages(db: psycopg.Connection) -> None:
    job_id = new_job(db, [[1], [2], [3]])
    claim_chunks(db, job_id, 2, LEASE)
    assert cancel_job(db, job_id)
    assert not touch(db, Ticket(job_id, 0, 1), LEASE)
    assert not record_progress(db, Ticket(job_id, 0, 1), [done(1, 0)], "all", LEASE)
    assert db.execute(
        "SELECT count(*) FROM job_chunks WHERE job_id = %s AND state = 'dispatched'", (job_id,)
    ).fetchone() == (0,)
    assert counts(db, job_id)[0] == "cancelled" and not cancel_job(db, job_id)
    assert retry_job(db, job_id) == (0, 0)  # resumes: its chunks are pending again
    assert counts(db, job_id)[0] == "running"


def test_unclaim_hands_back_the_dispatch(db: psycopg.Connection) -> None:
    job_id = new_job(db, [[1]])
    claim_chunks(db, job_id, 1, LEASE)
    unclaim(db, [Ticket(job_id, 0, 1)])
    assert db.execute("SELECT state, dispatches FROM job_chunks WHERE job_id = %s", (job_id,)).fetchone() == (
        "pending",
        0,
    )


@pytest.mark.parametrize(
    ("free", "jobs", "expected"),
    [
        (6, [("a", 0, 100), ("b", 0, 100)], {"a": 3, "b": 3}),
        (4, [("a", 4, 100), ("b", 0, 100)], {"b": 4}),
        (5, [("a", 0, 1), ("b", 0, 100)], {"a": 1, "b": 4}),
        (3, [("a", 0, 0)], {}),
        (0, [("a", 0, 5)], {}),
    ],
)
def test_allocate_evens_out_in_flight_chunks(
    free: int, jobs: list[tuple[str, int, int]], expected: dict
) -> None:  # type: ignore[type-arg]
    assert allocate(free, [RunningJob(j, {}, f, p) for j, f, p in jobs]) == expected


def test_claim_respects_the_budget_across_jobs(db: psycopg.Connection, settings: Settings) -> None:
    first, second = new_job(db, [[i] for i in range(20)]), new_job(db, [[i] for i in range(20)])
    small = settings.model_copy(update={"dispatch_budget_chunks": 6})
    report, claimed = claim(db, small)
    assert report.sent == 0 and len(claimed) == 6
    assert sorted(t.job_id for _, t in claimed) == sorted([first] * 3 + [second] * 3)
    assert claim(db, small)[1] == []  # the budget is full


def test_a_database_with_pre_ledger_job_tables_is_refused_in_one_line(
    private_database: PrivateDatabase,
) -> None:
    with (
        private_database("old", "bare") as env,
        psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn,
    ):
        conn.execute("CREATE TABLE jobs (id uuid PRIMARY KEY, state text)")  # version 1's shape
        with pytest.raises(ConfigError, match="drop tables job_items, job_chunks, jobs"):
            ensure_schema(conn)


def test_a_deadlock_is_run_again_by_the_database_layer(db: psycopg.Connection, settings: Settings) -> None:
    """Two transactions lock two chunk rows in opposite orders: PostgreSQL ends one with a
    deadlock (40P01), and Database.run runs it again, so both finish."""
    job_id = new_job(db, [[1], [2]])
    started = threading.Barrier(2)

    def lock_both(conn: psycopg.Connection, first: int, second: int) -> str:
        with conn.transaction():
            conn.execute(
                "SELECT 1 FROM job_chunks WHERE job_id = %s AND chunk_index = %s FOR UPDATE", (job_id, first)
            )
            with contextlib.suppress(threading.BrokenBarrierError):
                started.wait(timeout=5)  # only the first time: both hold one row, then want the other
            started.abort()
            conn.execute(
                "SELECT 1 FROM job_chunks WHERE job_id = %s AND chunk_index = %s FOR UPDATE", (job_id, second)
            )
            return "done"

    def run(first: int, second: int) -> str:
        database = Database(settings.database_url)
        try:
            return database.run(lock_both, first, second)
        finally:
            database.close()  # this thread's connection

    before = deadlocks(db)
    with ThreadPoolExecutor(2) as pool:
        outcomes = [pool.submit(run, a, b) for a, b in ((0, 1), (1, 0))]
        assert [outcome.result(timeout=60) for outcome in outcomes] == ["done", "done"]
    assert deadlocks(db) > before  # there was one, and it was retried
