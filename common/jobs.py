"""Job records in PostgreSQL: jobs, their chunks, and one row per output item."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import psycopg.errors
from psycopg.types.json import Jsonb

from common.db import retryable
from common.errors import UnknownJob

ItemStatus = Literal["uploaded", "done", "failed"]  # "uploaded": waiting for inference


@dataclass(frozen=True)
class ItemResult:
    """What a stage learned about one output item."""

    image_id: int
    variant: int
    status: ItemStatus
    output_uri: str | None = None
    error: str | None = None
    label: str | None = None
    score: float | None = None
    top_k: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class JobProgress:
    """A job's counts; `seconds` runs from creation to the last finished item (or now)."""

    job_id: str
    state: str
    total: int
    done: int
    failed: int
    seconds: float
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state != "enqueuing" and self.done + self.failed >= self.total

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
        }


def create_job(conn: psycopg.Connection, job_id: str, query: str, spec: dict[str, Any]) -> None:
    """Record a new job in state `enqueuing`."""
    conn.execute("INSERT INTO jobs (id, query, spec) VALUES (%s, %s, %s)", (job_id, query, Jsonb(spec)))


def record_chunk(
    conn: psycopg.Connection, job_id: str, chunk_index: int, image_ids: Sequence[int], items: int
) -> None:
    """Record one chunk and add its items to the job's total."""
    conn.execute(
        "INSERT INTO job_chunks (job_id, chunk_index, image_ids) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
        (job_id, chunk_index, list(image_ids)),
    )
    conn.execute("UPDATE jobs SET total = total + %s, chunks = chunks + 1 WHERE id = %s", (items, job_id))


def finish_enqueue(conn: psycopg.Connection, job_id: str) -> None:
    """Mark every chunk of the job as enqueued."""
    conn.execute(
        "UPDATE jobs SET state = 'enqueued', enqueued_at = clock_timestamp() WHERE id = %s",
        (job_id,),
    )


def fail_enqueue(conn: psycopg.Connection, job_id: str, error: str) -> None:
    """Mark a job whose query broke off while its ids were streamed."""
    conn.execute("UPDATE jobs SET state = 'enqueue_failed', error = %s WHERE id = %s", (error, job_id))


UPSERT_ITEMS = """
INSERT INTO job_items (job_id, image_id, variant, status, output_uri, error, label, score, top_k)
SELECT %(job_id)s, * FROM unnest(
    %(image_id)s::bigint[], %(variant)s::integer[], %(status)s::text[], %(output_uri)s::text[],
    %(error)s::text[], %(label)s::text[], %(score)s::real[], %(top_k)s::jsonb[])
ON CONFLICT (job_id, image_id, variant) DO UPDATE SET
    status = EXCLUDED.status, output_uri = COALESCE(EXCLUDED.output_uri, job_items.output_uri),
    error = EXCLUDED.error, label = EXCLUDED.label, score = EXCLUDED.score,
    top_k = EXCLUDED.top_k, updated_at = clock_timestamp()
-- a redelivered upload must not undo a finished inference
WHERE NOT (job_items.status = 'done' AND EXCLUDED.status = 'uploaded')
"""


@retryable
def record_items(conn: psycopg.Connection, job_id: str, results: Sequence[ItemResult]) -> None:
    """Upsert item results in one statement; rerunning a stage leaves the same rows."""
    if not results:
        return
    columns: dict[str, list[Any]] = {
        name: [] for name in ("image_id", "variant", "status", "output_uri", "error", "label")
    }
    columns["score"], columns["top_k"] = [], []
    for result in results:
        columns["image_id"].append(result.image_id)
        columns["variant"].append(result.variant)
        columns["status"].append(result.status)
        columns["output_uri"].append(result.output_uri)
        columns["error"].append(result.error)
        columns["label"].append(result.label)
        columns["score"].append(result.score)
        columns["top_k"].append(None if result.top_k is None else json.dumps(result.top_k))
    try:
        with conn.transaction():
            conn.execute(UPSERT_ITEMS, {"job_id": job_id, **columns})
    except psycopg.errors.ForeignKeyViolation as exc:
        raise UnknownJob(
            f"job {job_id} is not in this worker's database: is DATABASE_URL the producer's?"
        ) from exc


def job_progress(conn: psycopg.Connection, job_id: str) -> JobProgress | None:
    """Counts of a job, or None when there is no such job."""
    row = conn.execute(
        """
        SELECT j.state, j.total, j.error,
               count(*) FILTER (WHERE i.status = 'done'),
               count(*) FILTER (WHERE i.status = 'failed'),
               extract(epoch FROM coalesce(
                   CASE WHEN j.state <> 'enqueuing'
                         AND count(*) FILTER (WHERE i.status IN ('done', 'failed')) >= j.total
                        THEN greatest(max(i.updated_at), j.enqueued_at) END,
                   clock_timestamp()) - j.created_at)
        FROM jobs j LEFT JOIN job_items i ON i.job_id = j.id
        WHERE j.id = %s
        GROUP BY j.id
        """,
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    state, total, error, done, failed, seconds = row
    return JobProgress(job_id, state, total, done, failed, float(seconds), error)


def iter_results(conn: psycopg.Connection, job_id: str, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """Every item of a job as a dict, streamed with a server-side cursor."""
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


def unfinished_chunks(
    conn: psycopg.Connection, job_id: str, variants: int
) -> Iterable[tuple[int, list[int]]]:
    """Chunks of a job with at least one item neither done nor failed."""
    return conn.execute(
        """
        SELECT c.chunk_index, c.image_ids FROM job_chunks c
        WHERE c.job_id = %s AND (
            SELECT count(*) FROM job_items i
            WHERE i.job_id = c.job_id AND i.image_id = ANY (c.image_ids)
              AND i.status IN ('done', 'failed')
        ) < cardinality(c.image_ids) * %s
        ORDER BY c.chunk_index
        """,
        (job_id, variants),
    ).fetchall()


def lookup_images(
    conn: psycopg.Connection, image_ids: Sequence[int]
) -> dict[int, tuple[str, str | None, str | None]]:
    """id -> (status, raw_key, error) for the ids the images table knows."""
    rows = conn.execute(
        "SELECT id, status, raw_key, error FROM images WHERE id = ANY (%s)", (list(image_ids),)
    ).fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}
