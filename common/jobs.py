"""Job records in PostgreSQL: recording a job, its progress, results, cancel and retry."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from common.errors import UserError


@dataclass(frozen=True)
class JobProgress:
    """A job's counts, read from counters (never by scanning items)."""

    job_id: str
    state: str  # recording (running while its selection is still read), running, finished, cancelled, failed
    total: int
    done: int
    failed: int
    seconds: float  # from creation to the end (or now)
    chunks: int = 0
    in_flight: int = 0  # chunks dispatched now
    created_at: str = ""
    error: str | None = None  # why a failed job failed
    slicing: str | None = None  # how its selection was cut into slices, or why it was not
    inferred: int | None = None  # images its model ran on (the rest from the catalog); None: no model

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def ended(self) -> bool:
        """Nothing more will happen without a command (finished, cancelled or failed)."""
        return self.state not in ("running", "recording")

    def as_dict(self) -> dict[str, Any]:
        shown = {
            "job_id": self.job_id,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
        }
        if self.inferred is not None:
            shown["inferred"] = self.inferred
        return shown | ({"error": self.error} if self.error else {})


def record_job(
    conn: psycopg.Connection,
    job_id: str,
    query: str,
    spec: dict[str, Any],
    chunk_rows: Iterable[tuple[int, list[int], int]],
) -> tuple[int, int]:
    """Record a job and its chunks in one transaction: the job exists whole or not at all.
    `chunk_rows` are (chunk index, image ids, items), streamed into job_chunks by binary COPY.
    Returns (chunks, items); a job without items is finished at once."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO jobs (id, query, spec, recorded_at) VALUES (%s, %s, %s, clock_timestamp())",
            (job_id, query, Jsonb(spec)),
        )
        with (
            conn.cursor() as cursor,
            cursor.copy(
                "COPY job_chunks (job_id, chunk_index, image_ids, items) FROM STDIN (FORMAT binary)"
            ) as copy,
        ):
            copy.set_types(["uuid", "integer", "bigint[]", "integer"])
            job = uuid.UUID(job_id)
            for index, image_ids, items in chunk_rows:
                copy.write_row((job, index, image_ids, items))
        totals = conn.execute(
            """UPDATE jobs SET (chunks, total) = (
                   SELECT count(*), coalesce(sum(items), 0) FROM job_chunks WHERE job_id = %(job)s)
               WHERE id = %(job)s RETURNING chunks, total""",
            {"job": job_id},
        ).fetchone()
        assert totals is not None
        conn.execute(
            "UPDATE jobs SET state = 'finished', finished_at = clock_timestamp() WHERE id = %s AND total = 0",
            (job_id,),
        )
        wake_dispatchers(conn)
    return int(totals[0]), int(totals[1])


WAKE_CHANNEL = "quarry_dispatch"  # NOTIFYed where chunks become pending: dispatchers tick at once


def wake_dispatchers(conn: psycopg.Connection) -> None:
    """Tell listening dispatchers there is work (delivered when the transaction commits; a
    dispatcher that misses it finds the work on its next tick anyway)."""
    conn.execute(f"NOTIFY {WAKE_CHANNEL}")


PROGRESS = """
SELECT j.id, CASE WHEN j.state = 'running' AND j.recorded_at IS NULL THEN 'recording' ELSE j.state END,
       (j.total + coalesce(r.items, 0))::bigint, j.done + coalesce(f.done, 0),
       j.failed + coalesce(f.failed, 0),
       extract(epoch FROM coalesce(j.finished_at, clock_timestamp()) - j.created_at),
       (j.chunks + coalesce(r.chunks, 0))::integer, coalesce(f.chunks, 0),
       to_char(j.created_at, 'YYYY-MM-DD HH24:MI:SS'),
       j.error, j.slicing,
       CASE WHEN j.spec ->> 'model' IS NOT NULL THEN j.inferred + coalesce(f.inferred, 0) END
FROM jobs j LEFT JOIN LATERAL (
    -- what a recording job has committed so far (common/recording.py)
    SELECT sum(b.chunks) AS chunks, sum(b.items) AS items FROM recorded_batches b WHERE b.job_id = j.id
) r ON true LEFT JOIN LATERAL (
    -- items already recorded in the chunks now in flight (at most the dispatch budget)
    SELECT sum(c.done) AS done, sum(c.failed) AS failed, count(*) AS chunks,
           sum(bit_count(c.inferred_mask)) AS inferred
    FROM job_chunks c WHERE c.job_id = j.id AND c.state = 'dispatched'
) f ON true
"""


def progress_from_row(row: tuple[Any, ...]) -> JobProgress:
    job_id, state, total, done, failed, seconds, chunks, in_flight, created, error, slicing, inferred = row
    return JobProgress(
        str(job_id),
        state,
        total,
        int(done),
        int(failed),
        float(seconds),
        chunks,
        int(in_flight),
        created,
        error,
        slicing,
        None if inferred is None else int(inferred),
    )


def job_progress(conn: psycopg.Connection, job_id: str) -> JobProgress | None:
    """Counts of a job, or None when there is no such job."""
    row = conn.execute(PROGRESS + " WHERE j.id = %s", (job_id,)).fetchone()
    return None if row is None else progress_from_row(row)


def list_jobs(conn: psycopg.Connection, limit: int) -> list[JobProgress]:
    """The newest jobs first."""
    rows = conn.execute(PROGRESS + " ORDER BY j.created_at DESC LIMIT %s", (limit,)).fetchall()
    return [progress_from_row(row) for row in rows]


def current_jobs(conn: psycopg.Connection, ended_within_s: float) -> list[JobProgress]:
    """The running jobs and those that ended in the last `ended_within_s` seconds."""
    rows = conn.execute(
        PROGRESS
        + " WHERE j.state = 'running' OR j.finished_at > clock_timestamp() - make_interval(secs => %s)",
        (ended_within_s,),
    ).fetchall()
    return [progress_from_row(row) for row in rows]


def job_spec(conn: psycopg.Connection, job_id: str) -> dict[str, Any]:
    """A job's stored spec; UserError when there is no such job."""
    row = conn.execute("SELECT spec FROM jobs WHERE id = %s", (job_id,)).fetchone()
    if row is None:
        raise UserError(f"no job {job_id}")
    return dict(row[0])


def cancel_job(conn: psycopg.Connection, job_id: str) -> bool:
    """Stop dispatching a running job and return its in-flight chunks to pending (the stages drop
    messages of a cancelled job); False when it was not running."""
    with conn.transaction():
        if lock_job(conn, job_id) != "running":
            return False
        conn.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = clock_timestamp() WHERE id = %s", (job_id,)
        )
        return_dispatched(conn, job_id)
    return True


def selection_recorded(conn: psycopg.Connection, job_id: str) -> bool:
    row = conn.execute("SELECT recorded_at IS NOT NULL FROM jobs WHERE id = %s", (job_id,)).fetchone()
    return bool(row and row[0])


def return_dispatched(conn: psycopg.Connection, job_id: str) -> None:
    """A stopped job's in-flight chunks go back to pending (the stages drop their messages)."""
    conn.execute(
        """
        UPDATE job_chunks c SET state = 'pending', lease_until = NULL
        FROM (SELECT chunk_index FROM job_chunks WHERE job_id = %(job)s AND state = 'dispatched'
              ORDER BY chunk_index FOR UPDATE) d
        WHERE c.job_id = %(job)s AND c.chunk_index = d.chunk_index
        """,
        {"job": job_id},
    )


def lock_job(conn: psycopg.Connection, job_id: str) -> str:
    """Lock a job's row FOR UPDATE, the first lock of a command that changes the job's state
    (docs/decisions.md, "Lock order"): it waits for transactions recording into the job's chunks
    to end and keeps new ones out until it commits. The job's state; UserError if there is none."""
    row = conn.execute("SELECT state FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
    if row is None:
        raise UserError(f"no job {job_id}")
    return str(row[0])


def retry_job(conn: psycopg.Connection, job_id: str) -> tuple[int, int]:
    """Run the failed items of an ended job again (a cancelled job also resumes its pending
    chunks); returns (chunks reset, items reset). Done items are kept and not redone."""
    with conn.transaction():
        if lock_job(conn, job_id) == "running":
            raise UserError(f"job {job_id} is still running: retry it when it has ended (or cancel it)")
        if not selection_recorded(conn, job_id):
            raise UserError(
                f"job {job_id} ended before its selection was recorded whole: run its query again"
            )
        counted = conn.execute(
            """
            WITH old AS (
                SELECT chunk_index, state, done, failed,
                       coalesce(bit_count(inferred_mask), 0) AS inferred FROM job_chunks
                WHERE job_id = %(job)s AND failed > 0 AND state <> 'dispatched'
                ORDER BY chunk_index FOR UPDATE
            ), reset AS (
                UPDATE job_chunks c SET state = 'pending', attempts = 0, started_by = NULL, failed = 0,
                    failed_mask = NULL, last_error = NULL, lease_until = NULL
                FROM old WHERE c.job_id = %(job)s AND c.chunk_index = old.chunk_index
                RETURNING old.state, old.done, old.failed, old.inferred
            )
            SELECT count(*), coalesce(sum(failed), 0),
                   coalesce(sum(done) FILTER (WHERE state = 'finished'), 0),
                   coalesce(sum(failed) FILTER (WHERE state = 'finished'), 0),
                   coalesce(sum(inferred) FILTER (WHERE state = 'finished'), 0)
            FROM reset
            """,
            {"job": job_id},
        ).fetchone()
        assert counted is not None  # an aggregate always returns a row
        chunks, items, done_back, failed_back, inferred_back = counted
        conn.execute("DELETE FROM job_items WHERE job_id = %s AND status = 'failed'", (job_id,))
        wake_dispatchers(conn)
        conn.execute(
            """UPDATE jobs SET done = done - %s, failed = failed - %s, inferred = inferred - %s,
                   finished_at = NULL, state = 'running'
               WHERE id = %s""",
            (done_back, failed_back, inferred_back, job_id),
        )
        conn.execute(
            "UPDATE jobs SET state = 'finished', finished_at = clock_timestamp()"
            " WHERE id = %s AND done + failed >= total",
            (job_id,),
        )
    return int(chunks), int(items)


def iter_results(conn: psycopg.Connection, job_id: str, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """Every item row of a job as a dict, streamed with a server-side cursor."""
    with conn.transaction(), conn.cursor(name=f"results_{job_id.replace('-', '')}") as cursor:
        cursor.itersize = batch
        cursor.execute(
            "SELECT image_id, variant, status, output_uri, error, label, score, top_k"
            " FROM job_items WHERE job_id = %s ORDER BY image_id, variant",
            (job_id,),
        )
        for image_id, variant, status, uri, error, label, score, top_k in cursor:
            row: dict[str, Any] = {"image_id": image_id, "variant": variant, "status": status}
            row["uri"] = uri
            if error is not None:
                row["error"] = error
            if label is not None:
                row.update(label=label, score=score, top_k=top_k)
            yield row


def dispatcher_last_seen_s(conn: psycopg.Connection) -> float | None:
    """Seconds since any dispatcher last said it was alive; None if none ever did."""
    row = conn.execute("SELECT extract(epoch FROM now() - max(seen_at)) FROM dispatchers").fetchone()
    return None if row is None or row[0] is None else float(row[0])
