"""Recording a selection in slices, against a real PostgreSQL: exact ids, one slice where slicing
would change the result, failure, cancel and early finishes while the rest is still recorded."""

import os
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from common.config import Settings, get_settings
from common.db import connect
from common.errors import JobFailed
from common.jobs import cancel_job, job_progress
from common.jobspec import JobSpec
from common.ledger import ItemResult, Ticket, claim_chunks, open_chunk, record_progress
from common.recording import fail_orphaned_recordings
from quarry.query import user_session
from quarry.record import Recording
from quarry.submit import start_job, submit_job
from tests.conftest import PrivateDatabase, run_cli
from tests.stack import BIN, wait_until

DATASET = "sliced"
SHARDS = 4
# ids with gaps (a third of 1..6000 missing, and nothing from 2000 to 2999), spread over 4 shards
CATALOG = f"""
CREATE TABLE {DATASET} (id bigint PRIMARY KEY, colour text, size integer);
INSERT INTO {DATASET} SELECT g, (ARRAY['red', 'blue', 'green'])[1 + g % 3], g % 10
FROM generate_series(1, 6000) AS g WHERE g % 3 <> 0 AND g NOT BETWEEN 2000 AND 2999;
"""
# STABLE as declared (so a query calling it may be sliced), slow as written: an id in (low, high]
# takes 20 ms, so a slice of 250 such ids outlasts a 1 s statement timeout
SLOW = """
CREATE OR REPLACE FUNCTION slow_between(bigint, bigint, bigint) RETURNS boolean STABLE LANGUAGE sql
AS 'SELECT $1 <= $2 OR $1 > $3 OR pg_sleep(0.02) IS NOT NULL'
"""


@pytest.fixture(scope="module")
def private(private_database: PrivateDatabase) -> Iterator[tuple[Settings, dict[str, str]]]:
    """A database of this module's own, with the dataset: the session's dispatcher and pools
    (started by earlier modules) must not take these jobs' chunks."""
    with private_database("selection", "schema") as env:
        url = env["DATABASE_URL"]
        settings = get_settings().model_copy(update={"database_url": url})
        with connect(url, autocommit=True) as conn:
            make_dataset(conn)
        yield settings, env


def make_dataset(db: psycopg.Connection) -> None:
    """A dataset whose ids have gaps, its images in several shards (rows only: nothing is read)."""
    db.execute(CATALOG)
    db.execute(f"GRANT SELECT ON {DATASET} TO quarry_reader")
    dataset = db.execute(
        "INSERT INTO datasets (name, id_column, format) VALUES (%s, 'id', 'webdataset') RETURNING id",
        (DATASET,),
    ).fetchone()
    assert dataset is not None
    shards = [
        db.execute(
            "INSERT INTO shards (uri, size, etag) VALUES (%s, 1, 'e') RETURNING id",
            (f"s3://quarry-raw/test-sliced/{n:05d}.tar",),
        ).fetchone()[0]  # type: ignore[index]
        for n in range(SHARDS)
    ]
    db.execute(
        f"""INSERT INTO locations (dataset, id, shard, byte_offset, byte_length)
            SELECT %s, id, (%s::bigint[])[1 + id / 1500], id * 512, 100 FROM {DATASET}""",
        (dataset[0], shards),
    )
    db.execute(SLOW)


@pytest.fixture
def settings(private: tuple[Settings, dict[str, str]]) -> Settings:
    return private[0]


@pytest.fixture
def cli_env(private: tuple[Settings, dict[str, str]]) -> dict[str, str]:
    return private[1]


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection]:
    """The private database; its jobs removed after each test."""
    with connect(settings.database_url, autocommit=True) as conn:
        yield conn
        conn.execute("TRUNCATE jobs, job_chunks, job_items, ingest_units, recorded_batches")


def small_slices(settings: Settings, slice_ids: int = 250, **more: object) -> Settings:
    return settings.model_copy(update={"selection_slice_ids": slice_ids, "selection_connections": 3, **more})


def new_spec(variants: int = 1) -> JobSpec:
    return JobSpec(job_id=str(uuid.uuid4()), variants=variants, dataset=DATASET)


def recorded_chunks(db: psycopg.Connection, job_id: str) -> list[tuple[int, list[int], int]]:
    return db.execute(  # type: ignore[return-value]
        "SELECT chunk_index, image_ids, items FROM job_chunks WHERE job_id = %s ORDER BY chunk_index",
        (job_id,),
    ).fetchall()


def selected(settings: Settings, query: str) -> list[int]:
    """The distinct ids the query returns, as the query role sees them, unsliced."""
    with user_session(settings) as conn:
        rows = conn.execute(f"SELECT DISTINCT q.id FROM ({query}) q WHERE q.id IS NOT NULL ORDER BY 1")
        return [int(row[0]) for row in rows]


@pytest.mark.parametrize(
    "query",
    [
        f"SELECT id FROM {DATASET}",
        f"SELECT id FROM {DATASET} WHERE colour = 'blue' AND size < 4",
        # a join with the locations of a byte range across two shards, and some ids twice
        f"""SELECT c.id FROM {DATASET} c JOIN locations l ON l.id = c.id
            JOIN datasets d ON d.id = l.dataset AND d.name = '{DATASET}'
            WHERE l.byte_offset BETWEEN 500000 AND 1500000 OR l.id % 11 = 0
            UNION ALL SELECT id FROM {DATASET} WHERE size = 7""",
        # ids outside the dataset's range come in their own slice, once
        f"SELECT id FROM {DATASET} WHERE size = 1 UNION ALL SELECT unnest(ARRAY[-5, 0, 9000, 12345])",
    ],
)
def test_a_sliced_selection_records_exactly_the_ids_of_the_unsliced_query(
    settings: Settings, db: psycopg.Connection, query: str
) -> None:
    spec = new_spec(variants=2)
    sliced_settings = small_slices(settings, slice_ids=250)
    chunks, items = submit_job(db, sliced_settings, query, spec, 40)
    progress = job_progress(db, spec.job_id)
    assert progress is not None and progress.slicing is not None
    assert progress.slicing.startswith("recorded in 24 slices of 250 ids")
    rows = recorded_chunks(db, spec.job_id)
    ids = [i for _, chunk, _ in rows for i in chunk]
    expected = selected(settings, query)
    inside = [i for i in ids if 1 <= i <= 5999]
    assert len(ids) == len(set(ids)) and sorted(ids) == expected  # each selected id once
    assert ids[: len(inside)] == inside == sorted(inside)  # in id (storage) order across chunks
    assert [index for index, _, _ in rows] == list(range(len(rows)))  # numbered densely
    assert all(len(chunk) == 40 for _, chunk, _ in rows[:-1])  # cut as the whole selection would be
    assert all(n == 2 * len(chunk) for _, chunk, n in rows)
    assert (chunks, items) == (len(rows), 2 * len(expected))
    assert progress.state == "running" and progress.total == items


@pytest.mark.parametrize(
    ("query", "why"),
    [
        (f"SELECT id FROM {DATASET} ORDER BY id LIMIT 700", "it has a LIMIT"),
        (f"SELECT id FROM {DATASET} ORDER BY random() LIMIT 300", "it has a LIMIT"),
        (f"SELECT id FROM {DATASET} WHERE random() < 2", "it calls a volatile function (random())"),
        (f"SELECT max(id) AS id FROM {DATASET} GROUP BY colour", "it groups rows (GROUP BY)"),
        (f"SELECT DISTINCT ON (colour) id FROM {DATASET} ORDER BY colour, id", "it has DISTINCT ON"),
        ("SELECT generate_series(1, 500) AS id", f"it does not read the dataset's table {DATASET}"),
    ],
)
def test_a_query_that_slicing_would_change_is_recorded_as_one_slice(
    settings: Settings, db: psycopg.Connection, query: str, why: str
) -> None:
    spec = new_spec()
    chunks, items = submit_job(db, small_slices(settings), query, spec, 100)
    progress = job_progress(db, spec.job_id)
    assert progress is not None and progress.slicing == f"recorded as one slice: {why}"
    ids = [i for _, chunk, _ in recorded_chunks(db, spec.job_id) for i in chunk]
    assert len(ids) == len(set(ids)) == items
    assert ids == sorted(ids)
    if "random" not in query:
        assert ids == selected(settings, query)
    assert chunks == -(-items // 100)


def finish_chunk(db: psycopg.Connection, job_id: str, chunk: int) -> None:
    """What a worker does with a chunk: claim, open, record every item done."""
    claimed = dict(claim_chunks(db, job_id, 10_000, 60))
    ticket = Ticket(job_id, chunk, claimed[chunk])
    opened = open_chunk(db, ticket, 60)
    assert opened is not None
    results = [ItemResult(i, 0, slot, "done") for slot, i in enumerate(opened.image_ids)]
    assert record_progress(db, ticket, results, "failures", 60)
    db.execute(
        "UPDATE job_chunks SET state = 'pending' WHERE job_id = %s AND state = 'dispatched'", (job_id,)
    )


def test_a_query_that_times_out_halfway_fails_the_job_and_keeps_its_done_chunks(
    settings: Settings, db: psycopg.Connection
) -> None:
    spec = new_spec()
    query = f"SELECT id FROM {DATASET} WHERE slow_between(id, 300, 600)"
    recording = start_job(db, small_slices(settings, 250, query_timeout_s=1), query, spec, 50)
    finish_chunk(db, spec.job_id, 0)  # done while the rest is still being read
    with pytest.raises(JobFailed) as failure:
        recording.wait(60)
    assert str(failure.value) == (
        f"job {spec.job_id} failed while recording its selection: query exceeded the statement timeout of 1 s"
    )
    progress = job_progress(db, spec.job_id)
    assert progress is not None
    assert (progress.state, progress.error) == ("failed", "query exceeded the statement timeout of 1 s")
    assert progress.done == 50 and progress.in_flight == 0
    assert db.execute(
        "SELECT state, done FROM job_chunks WHERE job_id = %s AND chunk_index = 0", (spec.job_id,)
    ).fetchone() == ("finished", 50)


def test_cancel_during_recording_stops_the_recording_and_the_job(
    settings: Settings, db: psycopg.Connection
) -> None:
    spec = new_spec()
    query = f"SELECT id FROM {DATASET} WHERE slow_between(id, 300, 6000)"  # 20 ms an id after 300
    recording = start_job(db, small_slices(settings, 250, selection_connections=1), query, spec, 50)
    assert recording.outcome.state == "recording"
    assert cancel_job(db, spec.job_id)
    # ended, and cancelled: read through, the rest of this selection sleeps about 80 s (20 ms an
    # id over about 4,000 ids), so ending within the wait means the slices' statements were cut off
    assert recording.wait(30).state == "cancelled"
    progress = job_progress(db, spec.job_id)
    assert progress is not None and progress.state == "cancelled"
    chunks = progress.chunks
    running = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE state = 'active' AND query LIKE '%slow_between%' AND pid <> pg_backend_pid()"
    )
    wait_until(lambda: db.execute(running).fetchone() == (0,), 30, "the slices' statements to end")
    assert job_progress(db, spec.job_id).chunks == chunks  # type: ignore[union-attr]
    assert chunks < db.execute(f"SELECT count(*) / 50 FROM {DATASET}").fetchone()[0]  # type: ignore[index]


def test_a_job_whose_first_chunks_finish_before_its_last_are_recorded_ends_exact(
    settings: Settings, db: psycopg.Connection
) -> None:
    spec = new_spec()
    query = f"SELECT id FROM {DATASET} WHERE slow_between(id, 5600, 6000)"
    recording: Recording = start_job(db, small_slices(settings, 250), query, spec, 50)
    first = recorded_chunks(db, spec.job_id)[0][0]
    finish_chunk(db, spec.job_id, first)
    while_recording = job_progress(db, spec.job_id)
    assert while_recording is not None and while_recording.state == "recording"
    assert while_recording.done == 50 < while_recording.total
    recording.wait(120)
    for index, _, _ in recorded_chunks(db, spec.job_id):
        if index != first:
            finish_chunk(db, spec.job_id, index)
    progress = job_progress(db, spec.job_id)
    expected = len(selected(settings, query))
    assert progress is not None
    assert (progress.state, progress.total, progress.done, progress.failed) == (
        "finished",
        expected,
        expected,
        0,
    )


def test_a_job_that_finishes_every_recorded_chunk_waits_for_the_rest_of_its_selection(
    settings: Settings, db: psycopg.Connection
) -> None:
    spec = new_spec()
    query = f"SELECT id FROM {DATASET} WHERE slow_between(id, 400, 500)"
    recording = start_job(db, small_slices(settings, 250, selection_connections=1), query, spec, 50)
    for index, _, _ in recorded_chunks(db, spec.job_id):
        finish_chunk(db, spec.job_id, index)
    early = job_progress(db, spec.job_id)
    assert early is not None and early.state == "recording" and early.done == early.total > 0
    recording.wait(120)
    progress = job_progress(db, spec.job_id)
    assert progress is not None and progress.state == "running" and progress.total > early.total


def slow_cli_env(cli_env: dict[str, str], **more: str) -> dict[str, str]:
    return {**cli_env, "SELECTION_SLICE_IDS": "250", "SELECTION_CONNECTIONS": "1", **more}


def test_the_cli_says_a_selection_that_failed_halfway_in_one_line_and_exits_1(
    cli_env: dict[str, str], db: psycopg.Connection
) -> None:
    query = f"SELECT id FROM {DATASET} WHERE slow_between(id, 300, 600)"
    env = slow_cli_env(cli_env, QUERY_TIMEOUT_S="1")
    result = run_cli("run", "--dataset", DATASET, "--query", query, env=env, check=False)
    assert result.returncode == 1
    job_id = db.execute("SELECT id::text FROM jobs").fetchone()[0]  # type: ignore[index]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: job {job_id} failed while recording its selection:"
        " query exceeded the statement timeout of 1 s"
    )
    status = run_cli("status", job_id, env=env)
    assert "(failed)" in status.stdout and status.stdout.strip().endswith(
        "; query exceeded the statement timeout of 1 s"
    )


def test_a_producer_killed_while_recording_leaves_a_failed_job_not_a_stuck_one(
    cli_env: dict[str, str], db: psycopg.Connection
) -> None:
    query = f"SELECT id FROM {DATASET} WHERE slow_between(id, 300, 6000)"
    producer = subprocess.Popen(
        [str(BIN / "producer"), "run", "--dataset", DATASET, "--query", query],
        env={**os.environ, **slow_cli_env(cli_env)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: db.execute("SELECT count(*) FROM job_chunks").fetchone()[0], 60, "the first chunks"
        )  # type: ignore[index]
        assert fail_orphaned_recordings(db) == 0  # its producer is alive: not an orphan
    finally:
        producer.kill()
        producer.wait()
    wait_until(lambda: fail_orphaned_recordings(db), 30, "the dispatcher's check to fail the job")
    (job_id,) = db.execute("SELECT id::text FROM jobs").fetchone()  # type: ignore[misc]
    progress = job_progress(db, job_id)
    assert progress is not None and progress.state == "failed"
    assert progress.error == "the producer recording its selection went away before it was recorded whole"
