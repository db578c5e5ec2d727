"""The ledger's side of recording a selection while its first chunks already run.

A job is created `running` with `recorded_at` NULL (shown as `recording`); each batch of chunks is
committed with the job's growing counts, and the dispatcher sends them as they come. The job can
only finish once `recorded_at` is set (common/ledger.py), so chunks that finish early never end
it short. A recording that fails ends the job `failed`; one that fails before any chunk was
committed leaves no job at all. Lock order as everywhere: the job row first (docs/decisions.md).
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
    """Commit chunks of a recording job with its counts; False (nothing written) when the job is no
    longer running (cancelled, failed)."""
    if not rows:
        return True
    register_packed_ids(conn)
    with conn.transaction():
        items = sum(count for _, _, count in rows) * variants
        running = conn.execute(
            """UPDATE jobs SET chunks = chunks + %s, total = total + %s
               WHERE id = %s AND state = 'running' AND recorded_at IS NULL RETURNING 1""",
            (len(rows), items, job_id),
        ).fetchone()
        if running is None:
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
        wake_dispatchers(conn)
    return True


def close_recording(conn: psycopg.Connection, job_id: str) -> str:
    """The selection is whole: the total is final, and a job all of whose items are in already
    (or that selected none) finishes now. The job's state."""
    row = conn.execute(
        """UPDATE jobs SET recorded_at = clock_timestamp(), recorder_pid = NULL,
               state = CASE WHEN done + failed >= total THEN 'finished' ELSE state END,
               finished_at = CASE WHEN done + failed >= total THEN clock_timestamp() END
           WHERE id = %s AND state = 'running' RETURNING state""",
        (job_id,),
    ).fetchone()
    return "cancelled" if row is None else str(row[0])


def fail_recording(conn: psycopg.Connection, job_id: str, error: str) -> None:
    """End a recording job `failed` with `error`: its done chunks stay done, its in-flight ones go
    back to pending, and the stages drop their messages."""
    with conn.transaction():
        row = conn.execute("SELECT state FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
        if row is None or row[0] != "running":
            return
        conn.execute(
            """UPDATE jobs SET state = 'failed', error = %s, finished_at = clock_timestamp(),
                   recorder_pid = NULL
               WHERE id = %s""",
            (error[:2000], job_id),
        )
        return_dispatched(conn, job_id)


def discard_recording(conn: psycopg.Connection, job_id: str) -> bool:
    """Remove a job none of whose chunks was committed (its query failed at once): a refused
    query leaves nothing behind. False when it has chunks (then it is failed instead)."""
    return bool(
        conn.execute(
            "DELETE FROM jobs WHERE id = %s AND chunks = 0 AND recorded_at IS NULL", (job_id,)
        ).rowcount
    )


def fail_orphaned_recordings(conn: psycopg.Connection) -> int:
    """Recording jobs whose producer is gone (its session ended: killed, or cut off) fail with one
    line, for the dispatcher to stop waiting on them; how many."""
    orphans = conn.execute(
        """SELECT id FROM jobs j
           WHERE j.state = 'running' AND j.recorded_at IS NULL
             AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = j.recorder_pid)
           ORDER BY id FOR UPDATE SKIP LOCKED"""
    ).fetchall()
    for (job_id,) in orphans:
        conn.execute(
            """UPDATE jobs SET state = 'failed', finished_at = clock_timestamp(), recorder_pid = NULL,
                   error = 'the producer recording its selection went away before it was recorded whole'
               WHERE id = %s""",
            (job_id,),
        )
        return_dispatched(conn, str(job_id))
    return len(orphans)
