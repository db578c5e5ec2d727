"""`producer run`: select ids with SQL, record the job and its chunks, enqueue the chunks."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

import psycopg
from celery import Celery

from common.batching import batched
from common.db import first_line
from common.jobs import create_job, fail_enqueue, finish_enqueue, record_chunk, unfinished_chunks
from common.jobspec import JobSpec
from producer.query import stream_ids
from workers.routes import TRANSFORM

log = logging.getLogger(__name__)


def new_job_id() -> str:
    return str(uuid.uuid4())


def submit_job(
    conn: psycopg.Connection,
    app: Celery,
    database_url: str,
    sql: str,
    spec: JobSpec,
    chunk_size: int,
    timeout_s: int,
) -> int:
    """Run the query and enqueue its ids in chunks; returns the number of chunks.

    The query is checked before the job is recorded: a refused query leaves no trace. A query
    that breaks off mid-stream marks the job `enqueue_failed`; the chunks already sent still run.
    """
    with stream_ids(database_url, sql, timeout_s, batch=max(chunk_size, 1000)) as ids:
        create_job(conn, spec.job_id, sql, spec.to_message())
        try:
            chunks = enqueue_chunks(conn, app, spec, enumerate(batched(ids, chunk_size)))
        except Exception as exc:  # the job is recorded: say why it stopped, then re-raise
            fail_enqueue(conn, spec.job_id, first_line(exc))
            raise
    finish_enqueue(conn, spec.job_id)
    return chunks


def enqueue_chunks(
    conn: psycopg.Connection,
    app: Celery,
    spec: JobSpec,
    chunks: Iterable[tuple[int, list[int]]],
    *,
    record: bool = True,
) -> int:
    """Record each chunk, then send it to the transform queue (record first, so `resume`
    can resend anything a crash left unsent)."""
    message = spec.to_message()
    count = 0
    for index, image_ids in chunks:
        if record:
            record_chunk(conn, spec.job_id, index, image_ids, len(image_ids) * spec.variants)
        app.send_task(TRANSFORM, args=[message, image_ids])
        count += 1
    return count


def resume_job(conn: psycopg.Connection, app: Celery, spec: JobSpec) -> int:
    """Resend every chunk of a job that still has unfinished items; returns how many."""
    pending = unfinished_chunks(conn, spec.job_id, spec.variants)
    return enqueue_chunks(conn, app, spec, pending, record=False)
