"""`producer run`: select ids with SQL and record the job and its chunks in the ledger.

Nothing is sent to the broker here: the dispatcher (`producer dispatch`) meters the chunks into
the transform queue as they are committed, while the rest of the selection is still being read
(quarry/record.py), so the first images move within a second or two whatever the selection's size.
"""

from __future__ import annotations

import uuid

import psycopg

from common.config import Settings
from common.datasets import id_bounds
from common.jobs import job_progress
from common.jobspec import JobSpec
from quarry.query import check_query, check_selection, user_session
from quarry.record import Recording, Selection
from quarry.slicing import parse_tree, plan_slices, why_whole


def new_job_id() -> str:
    return str(uuid.uuid4())


def start_job(
    conn: psycopg.Connection, settings: Settings, sql: str, spec: JobSpec, chunk_size: int
) -> Recording:
    """Check the query (as the query role), cut it into slices over the job's dataset, and start
    recording on `conn`'s database; returns once the first chunks are committed. A refused query,
    or one that fails before its first chunk, raises QueryError and records nothing."""
    body = check_query(sql)
    with user_session(settings) as reader:
        check_selection(reader, body)
    keep_whole = why_whole(conn, parse_tree(body), spec.dataset)
    plan = plan_slices(id_bounds(conn, spec.dataset), settings.selection_slice_ids, keep_whole)
    selection = Selection(spec.job_id, sql, body, spec.to_message(), spec.variants, chunk_size, plan)
    return Recording(settings, selection).start()


def submit_job(
    conn: psycopg.Connection, settings: Settings, sql: str, spec: JobSpec, chunk_size: int
) -> tuple[int, int]:
    """Record the whole selection (as `start_job`, then waiting for its end); (chunks, items).
    JobFailed when the query failed halfway (the job is then `failed`)."""
    start_job(conn, settings, sql, spec, chunk_size).wait()
    progress = job_progress(conn, spec.job_id)
    assert progress is not None
    return progress.chunks, progress.total
