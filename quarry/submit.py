"""`producer run`: select ids with SQL and record the job and its chunks in the ledger.

Nothing is sent to the broker here: the dispatcher (`producer dispatch`) meters the chunks into
the transform queue, so the producer can exit as soon as the job is recorded.
"""

from __future__ import annotations

import uuid

import psycopg

from common.config import Settings
from common.jobs import record_job
from common.jobspec import JobSpec
from quarry.query import stream_chunks


def new_job_id() -> str:
    return str(uuid.uuid4())


def submit_job(
    conn: psycopg.Connection, settings: Settings, sql: str, spec: JobSpec, chunk_size: int
) -> tuple[int, int]:
    """Run the query (as the query role) and record the job with its ids in chunks on `conn`
    (the owner's); returns (chunks, items).

    The query is checked before anything is recorded, and the job is recorded in one
    transaction: a refused or broken-off query leaves no trace.
    """
    with stream_chunks(settings, sql, chunk_size=chunk_size, variants=spec.variants) as rows:
        return record_job(conn, spec.job_id, sql, spec.to_message(), rows)
