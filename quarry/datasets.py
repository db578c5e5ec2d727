"""Datasets as things a user manages: listed with their sizes, dropped with what Quarry made for
them. A dataset an ingest created and left without a row is dropped by that ingest."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from common.datasets import get_dataset
from common.embeddings import drop_dataset_sets
from common.errors import UserError

if TYPE_CHECKING:
    from common.config import Settings
    from common.storage import ObjectStore

# where Quarry puts a dataset's objects in RAW_BUCKET: packed image folders, uploaded local
# WebDataset shards, staged local manifest files (quarry/packing.py, shard_upload.py, ingest_plan.py)
QUARRY_PREFIXES = ("packed", "webdataset", "_quarry/manifests")


@dataclass(frozen=True)
class DatasetInfo:
    """One row of `producer datasets`."""

    name: str
    format: str
    source: str | None  # what its last ingest read
    rows: int  # catalog rows
    images: int  # rows with an image location (not a recorded failure)
    shards: int  # tar shards holding its images
    size: int | None  # bytes of those shards; None when its images are objects of their own
    registered: datetime

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "registered": self.registered.isoformat(timespec="seconds")}


def list_datasets(conn: psycopg.Connection) -> list[DatasetInfo]:
    """Every dataset, by name, with its counts (each read in full: a count of its table and of
    its locations)."""
    found = []
    for dataset_id, name, source_format, source, registered in conn.execute(
        "SELECT id, name, format, source, created_at FROM datasets ORDER BY name"
    ).fetchall():
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))).fetchone()
        images, shards, size = conn.execute(  # one pass over the dataset's locations, by shard
            """SELECT coalesce(sum(g.images), 0), count(g.shard), sum(s.size)
               FROM (SELECT shard, count(*) FILTER (WHERE error IS NULL) AS images
                     FROM locations WHERE dataset = %s GROUP BY shard) g
               LEFT JOIN shards s ON s.id = g.shard""",
            (dataset_id,),
        ).fetchone() or (0, 0, None)
        found.append(
            DatasetInfo(
                name,
                source_format,
                source,
                int(rows[0]) if rows else 0,
                int(images),
                int(shards),
                None if size is None else int(size),
                registered,
            )
        )
    return found


def drop_dataset(conn: psycopg.Connection, store: ObjectStore, name: str, settings: Settings) -> int:
    """Remove a dataset: its table, its locations, its shards' records, its ingest units (a later
    ingest of the same sources registers them again), and exactly the objects Quarry wrote for
    it: the shards and staged files those records name, in RAW_BUCKET under the dataset's own
    prefixes, that no other dataset still references; and its embeddings. Sources registered
    where they are stay. UserError while a job on it runs. How many objects were deleted."""
    with conn.transaction():
        dataset = get_dataset(conn, name)
        conn.execute("SELECT FROM datasets WHERE id = %s FOR UPDATE", (dataset.id,))
        if running := running_jobs(conn, name):
            raise UserError(
                f"dataset {name} is in use by running job {', '.join(running)}: cancel it or let it end first"
            )
        shards = [
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT shard FROM locations WHERE dataset = %s AND shard IS NOT NULL", (dataset.id,)
            )
        ]
        units = conn.execute(
            "DELETE FROM ingest_units WHERE job_id IN (SELECT id FROM jobs WHERE spec->>'dataset' = %s)"
            " RETURNING source, companion",
            (name,),
        ).fetchall()
        conn.execute("DELETE FROM datasets WHERE id = %s", (dataset.id,))  # its locations cascade
        removed = {
            row[0]
            for row in conn.execute(
                "DELETE FROM shards s WHERE s.id = ANY (%s)"
                " AND NOT EXISTS (SELECT FROM locations l WHERE l.shard = s.id) RETURNING uri",
                (shards,),
            )
        }
        still_used = {
            row[0]
            for row in conn.execute(
                "SELECT uri FROM shards WHERE uri = ANY(%s)", ([source for source, _ in units],)
            )
        }
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(dataset.table))
        drop_dataset_sets(conn, settings, name)
        conn.execute("DELETE FROM duplicates WHERE dataset = %s", (name,))
    from common.storage import parse_s3_uri  # boto3 loads only when something is deleted

    written = removed | {source for source, _ in units if source not in still_used}
    written |= {companion for source, companion in units if companion and source not in still_used}
    raw_bucket = settings.raw_bucket
    own = tuple(f"s3://{raw_bucket}/{prefix}/{name}/" for prefix in QUARRY_PREFIXES)
    deleted = 0
    for uri in sorted(uri for uri in written if uri.startswith(own)):
        store.delete(*parse_s3_uri(uri))
        deleted += 1
    return deleted


def running_jobs(conn: psycopg.Connection, name: str) -> list[str]:
    """The ids of the running jobs (image or ingest) on a dataset, oldest first."""
    rows = conn.execute(
        "SELECT id FROM jobs WHERE spec->>'dataset' = %s AND state = 'running' ORDER BY created_at", (name,)
    ).fetchall()
    return [str(row[0]) for row in rows]


def drop_if_empty(conn: psycopg.Connection, name: str) -> bool:
    """Drop a dataset that has no catalog row (an ingest that registered nothing) and no running
    job (an ingest interrupted while its units still register keeps it); True if it did."""
    with conn.transaction():
        row = conn.execute("SELECT id FROM datasets WHERE name = %s FOR UPDATE", (name,)).fetchone()
        if row is None or running_jobs(conn, name):
            return False
        table = sql.Identifier(name)
        if conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(table)).fetchone() != (False,):
            return False
        conn.execute("DELETE FROM datasets WHERE id = %s", (row[0],))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    return True
