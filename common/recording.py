"""The ledger's side of recording a selection while its first chunks already run.

A job is created `running` with `recorded_at` NULL (shown as `recording`); each batch of chunks is
committed with a row of its counts (`recorded_batches`, folded into the job's row at the end),
and the dispatcher sends them as they come. The job can
only finish once `recorded_at` is set (common/ledger.py), so chunks that finish early never end
it short. A recording that fails ends the job `failed`; one that fails before any chunk was
committed leaves no job at all. Lock order as everywhere (docs/decisions.md): the job row first.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg
from psycopg.types.json import Jsonb
from psycopg.types.numeric import Int4

from common.jobs import return_dispatched, wake_dispatchers
from common.packed_ids import PackedIds, register_packed_ids

ChunkRow = tuple[int, PackedIds, int]  # chunk index, its ids, how many


def open_recording(
    conn: psycopg.Connection, job_id: str, query: str, spec: dict[str, object], slicing: str
) -> None:
    """The job row, recording; this connection's backend is its recorder."""
    conn.execute(
        """INSERT INTO jobs (id, query, spec, slicing, recorder_pid)
           VALUES (%s, %s, %s, %s, pg_backend_pid())""",
        (job_id, query, Jsonb(spec), slicing),
    )


def append_chunks(conn: psycopg.Connection, job_id: str, rows: Sequence[ChunkRow], variants: int) -> bool:
    """Commit chunks of a recording job, with a row of their counts; False (nothing written)
    when the job is no longer running (cancelled, failed). The job's row is locked (FOR KEY
    SHARE: recorders share it, cancel waits for them) but not updated: under the recording's
    snapshot every update would leave a version no one can prune."""
    if not rows:
        return True
    register_packed_ids(conn)
    with conn.transaction():
        if not recording(conn, job_id):
            return False
        job = uuid.UUID(job_id)
        with (
            conn.cursor() as cursor,
            cursor.copy(
                "COPY job_chunks (job_id, chunk_index, image_ids, items) FROM STDIN (FORMAT binary)"
            ) as copy,
        ):
            for index, ids, count in rows:
                copy.write_row((job, Int4(index), ids, Int4(count * variants)))
        conn.execute(
            "INSERT INTO recorded_batches (job_id, chunks, items) VALUES (%s, %s, %s)",
            (job_id, len(rows), sum(count for _, _, count in rows) * variants),
        )
        wake_dispatchers(conn)
    return True


def recording(conn: psycopg.Connection, job_id: str) -> bool:
    row = conn.execute(
        "SELECT state = 'running' AND recorded_at IS NULL FROM jobs WHERE id = %s FOR KEY SHARE", (job_id,)
    ).fetchone()
    return bool(row and row[0])


def fold_batches(conn: psycopg.Connection, job_id: str) -> None:
    """Move the counts of the job's committed batches into its row (its row locked first)."""
    conn.execute(
        """WITH batches AS (DELETE FROM recorded_batches WHERE job_id = %(job)s RETURNING chunks, items)
           UPDATE jobs SET chunks = chunks + (SELECT coalesce(sum(chunks), 0) FROM batches),
               total = total + (SELECT coalesce(sum(items), 0) FROM batches), recorder_pid = NULL
           WHERE id = %(job)s""",
        {"job": job_id},
    )


def close_recording(conn: psycopg.Connection, job_id: str) -> str:
    """The selection is whole: the total is final, and a job all of whose items are in already
    (or that selected none) finishes now. The job's state (`cancelled` if it was meanwhile)."""
    with conn.transaction():
        if conn.execute("SELECT FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone() is None:
            return "cancelled"
        fold_batches(conn, job_id)
        row = conn.execute(
            """UPDATE jobs SET recorded_at = clock_timestamp(),
                   state = CASE WHEN done + failed >= total THEN 'finished' ELSE state END,
                   finished_at = CASE WHEN done + failed >= total THEN clock_timestamp() END
               WHERE id = %s AND state = 'running' RETURNING state""",
            (job_id,),
        ).fetchone()
    return "cancelled" if row is None else str(row[0])


def end_failed(conn: psycopg.Connection, job_id: str, error: str) -> bool:
    """Fail a recording job (its row locked first): counts folded, in-flight chunks back to
    pending (the stages drop their messages); False when it was not running any more."""
    fold_batches(conn, job_id)
    failed = conn.execute(
        """UPDATE jobs SET state = 'failed', error = %s, finished_at = clock_timestamp()
           WHERE id = %s AND state = 'running' AND recorded_at IS NULL""",
        (error[:2000], job_id),
    ).rowcount
    if failed:
        return_dispatched(conn, job_id)
    return bool(failed)


def fail_recording(conn: psycopg.Connection, job_id: str, error: str) -> None:
    """End a recording job `failed` with `error`: its done chunks stay done."""
    with conn.transaction():
        if conn.execute("SELECT FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone() is not None:
            end_failed(conn, job_id, error)


def discard_recording(conn: psycopg.Connection, job_id: str) -> bool:
    """Remove a job none of whose chunks was committed (its query failed at once): a refused
    query leaves nothing behind. False when it has chunks (then it is failed instead)."""
    return bool(
        conn.execute(
            """DELETE FROM jobs j WHERE id = %s AND recorded_at IS NULL
               AND NOT EXISTS (SELECT FROM recorded_batches b WHERE b.job_id = j.id)""",
            (job_id,),
        ).rowcount
    )


ORPHANED = "the producer recording its selection went away before it was recorded whole"


def fail_orphaned_recordings(conn: psycopg.Connection) -> int:
    """Recording jobs whose producer is gone (its session ended: killed, or cut off) fail with one
    line, for the dispatcher to stop waiting on them; how many."""
    orphans = conn.execute(  # locked only if orphaned: a live recording's row is its recorders'
        """SELECT id FROM jobs j
           WHERE j.state = 'running' AND j.recorded_at IS NULL
             AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = j.recorder_pid)"""
    ).fetchall()
    failed = 0
    for (job_id,) in orphans:
        if (
            conn.execute("SELECT FROM jobs WHERE id = %s FOR UPDATE SKIP LOCKED", (job_id,)).fetchone()
            is not None
        ):
            failed += end_failed(conn, str(job_id), ORPHANED)
    return failed
