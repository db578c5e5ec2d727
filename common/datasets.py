"""Datasets: each a catalog table of the user's own columns, and where each image's bytes are."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from common.errors import UserError
from common.sources import Source

NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED = frozenset(
    {"datasets", "shards", "locations", "images", "jobs", "job_chunks", "job_items", "dispatchers"}
    | {"schema_version", "predictions", "ingest_units", "holders", "holds", "recorded_batches"}
    | {"quarry_locks", "model_outputs", "embedding_sets", "embeddings", "duplicates"}
)
RESERVED_PREFIX = "embeddings_"  # the tables of common/embeddings.py
FASHION = "styles"  # the Kaggle archive's dataset (and table) name
FORMATS = (
    "kaggle",
    "folder",
    "classes",
    "imagefolder",
    "csv",
    "jsonl",
    "parquet",
    "webdataset",
)  # what `producer ingest` reads


@dataclass(frozen=True)
class Dataset:
    """One registered dataset; its catalog table is named `name`."""

    id: int
    name: str
    id_column: str
    key_column: str | None
    image_column: str | None
    format: str

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.name)


@dataclass(frozen=True)
class Location:
    """An image's bytes (`source`), or why there are none (`error`)."""

    source: Source | None
    error: str | None = None


def check_name(name: str, what: str = "dataset name") -> str:
    """A name usable as an unquoted SQL identifier and not one of Quarry's tables."""
    if not NAME.match(name):
        raise UserError(
            f"{what} {name!r}: use lower-case letters, digits and _ (at most 63, not a digit first)"
        )
    if name in RESERVED or name.startswith(RESERVED_PREFIX):
        raise UserError(f"{what} {name!r} is one of Quarry's own tables; choose another")
    return name


def get_dataset(conn: psycopg.Connection, name: str) -> Dataset:
    """The dataset called `name`; UserError naming the ones there are when there is none."""
    row = conn.execute(
        "SELECT id, name, id_column, key_column, image_column, format FROM datasets WHERE name = %s", (name,)
    ).fetchone()
    if row is None:
        known = ", ".join(dataset_names(conn)) or "none yet: run `producer ingest`"
        raise UserError(f"no dataset {name!r} (datasets: {known})")
    return Dataset(*row)


def id_bounds(conn: psycopg.Connection, name: str) -> tuple[int, int] | None:
    """The smallest and largest id of a dataset's catalog table (read from its id index); None
    when there is no such dataset or it has no rows."""
    row = conn.execute("SELECT id_column FROM datasets WHERE name = %s", (name,)).fetchone()
    if row is None:
        return None
    column = sql.Identifier(row[0])
    bounds = conn.execute(
        sql.SQL("SELECT min({}), max({}) FROM {}").format(column, column, sql.Identifier(name))
    ).fetchone()
    return None if bounds is None or bounds[0] is None else (int(bounds[0]), int(bounds[1]))


def dataset_names(conn: psycopg.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM datasets ORDER BY name").fetchall()]


def default_dataset(conn: psycopg.Connection, tables: Collection[str] = ()) -> str:
    """The dataset a job belongs to when none is named: the one whose table the query reads
    (`tables`: the tables it names), else the only one there is."""
    names = dataset_names(conn)
    read = [name for name in names if name in tables]
    if len(read) == 1:
        return read[0]
    if len(names) == 1:
        return names[0]
    if not names:
        raise UserError("no dataset ingested yet: run `producer ingest` first")
    if read:
        raise UserError(
            f"the query reads {len(read)} datasets' tables ({', '.join(read)}): name one with --dataset"
        )
    raise UserError(
        f"{len(names)} datasets ({', '.join(names)}) and the query reads none of their tables:"
        " name one with --dataset"
    )


def register_dataset(
    conn: psycopg.Connection,
    name: str,
    id_column: str,
    key_column: str | None,
    image_column: str | None,
    source_format: str,
) -> Dataset:
    """Record a dataset (an ingest of the same dataset again keeps the record); UserError when the
    name is taken with another id column."""
    conn.execute(
        "INSERT INTO datasets (name, id_column, key_column, image_column, format)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
        (name, id_column, key_column, image_column, source_format),
    )
    dataset = get_dataset(conn, name)
    if (dataset.id_column, dataset.key_column) != (id_column, key_column):
        raise UserError(
            f"dataset {name!r} exists with id column {dataset.key_column or dataset.id_column!r};"
            f" this ingest names {key_column or id_column!r}"
        )
    return dataset


LOCATIONS = """
SELECT l.id, coalesce(s.uri, l.uri), l.byte_offset, l.byte_length, coalesce(s.etag, l.etag), l.error,
       s.size
FROM locations l JOIN datasets d ON d.id = l.dataset LEFT JOIN shards s ON s.id = l.shard
WHERE d.name = %s AND l.id = ANY (%s)
"""


def lookup_locations(conn: psycopg.Connection, dataset: str, image_ids: list[int]) -> dict[int, Location]:
    """id -> where its bytes are, for the ids of `dataset` that have a location."""
    found = {}
    for image_id, uri, offset, length, etag, error, size in conn.execute(LOCATIONS, (dataset, image_ids)):
        source = None if uri is None else Source(uri, offset, length, etag, size)
        found[image_id] = Location(source, error)
    return found


def pin_etags(conn: psycopg.Connection, dataset: str, etags: dict[int, str]) -> None:
    """Record the ETag first read from objects registered without one: later reads must match."""
    if not etags:
        return
    # `l.id = ANY` gives the planner the ids to look up even where the table has no statistics
    conn.execute(
        """UPDATE locations l SET etag = p.etag
           FROM unnest(%s::bigint[], %s::text[]) AS p (id, etag)
           WHERE l.dataset = (SELECT d.id FROM datasets d WHERE d.name = %s) AND l.id = ANY (%s::bigint[])
             AND l.id = p.id AND l.etag IS NULL AND l.shard IS NULL""",
        (list(etags), list(etags.values()), dataset, list(etags)),
    )


def analyze_dataset(conn: psycopg.Connection, name: str) -> None:
    """Fresh planner statistics for what an ingest loaded. Without them PostgreSQL plans a new
    dataset's chunk-sized lookups and ETag pins as scans of all its rows, once per chunk (a first
    job over 30,000 registered images spent 0.6 ms of PostgreSQL's CPU an image on them); its
    autovacuum analyzes a table only after a fifth of it changed, or never where it is off.
    ANALYZE reads a fixed sample, so this costs the same at any size. Nothing when the ingest
    left no such dataset."""
    if name in dataset_names(conn):
        conn.execute(sql.SQL("ANALYZE locations, shards, {}").format(get_dataset(conn, name).table))


def lookup_catalog(conn: psycopg.Connection, dataset: str, image_ids: list[int]) -> dict[int, dict[str, Any]]:
    """id -> the dataset's catalog row (every column but the id), for the ids it knows."""
    table = get_dataset(conn, dataset)
    cursor = conn.execute(
        sql.SQL("SELECT * FROM {} WHERE {} = ANY (%s)").format(table.table, sql.Identifier(table.id_column)),
        (image_ids,),
    )
    names = [column.name for column in cursor.description or []]
    position = names.index(table.id_column)
    rows = {}
    for row in cursor:
        rows[row[position]] = {n: v for i, (n, v) in enumerate(zip(names, row, strict=True)) if i != position}
    return rows
