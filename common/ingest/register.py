"""Registering catalog rows and where their images are: rows COPY'd into temporary tables,
checked, then inserted in the caller's transaction (all of it, or nothing). A row registered
before is kept as it was: a re-run adds only what is new."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg
import pyarrow as pa
from psycopg import sql

from common.config import Settings
from common.datasets import Dataset
from common.errors import UserError
from common.ingest.tables import csv_payload

SHOWN_IDS = 5  # duplicate ids named in a refusal
S3_URI = r"^s3://[^/]+/.+"


@dataclass(frozen=True)
class Member:
    """An image inside a tar shard: whose (the catalog's id or key), and its data's bytes."""

    match: int | str
    offset: int
    length: int
    width: int | None = None
    height: int | None = None


def match_column(dataset: Dataset) -> sql.Identifier:
    """The column a manifest names rows by: the string key, else the integer id."""
    return sql.Identifier(dataset.key_column or dataset.id_column)


def load_rows(
    conn: psycopg.Connection, dataset: Dataset, columns: Sequence[str], batches: Iterable[pa.RecordBatch]
) -> int:
    """COPY catalog rows into the temporary table `load` (the catalog's types); refuse rows
    without an id and ids given twice. The number of rows."""
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    conn.execute("DROP TABLE IF EXISTS pg_temp.load")
    conn.execute(
        sql.SQL("CREATE TEMP TABLE load ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            names, dataset.table
        )
    )
    with conn.cursor().copy(sql.SQL("COPY load ({}) FROM STDIN (FORMAT csv)").format(names)) as copy:
        for batch in batches:
            copy.write(csv_payload(batch.select(list(columns))))
    match = match_column(dataset)
    counts = conn.execute(
        sql.SQL("SELECT count(*), count(*) FILTER (WHERE {} IS NULL) FROM load").format(match)
    ).fetchone()
    assert counts is not None
    if counts[1]:
        raise UserError(f"{counts[1]} rows have no {dataset.key_column or dataset.id_column}")
    twice = conn.execute(
        sql.SQL("SELECT {m}, count(*) FROM load GROUP BY {m} HAVING count(*) > 1 LIMIT %s").format(m=match),
        (SHOWN_IDS + 1,),
    ).fetchall()
    if twice:
        shown = ", ".join(f"{value!r} ({n}x)" for value, n in twice[:SHOWN_IDS])
        more = " and more" if len(twice) > SHOWN_IDS else ""
        raise UserError(
            f"duplicate {dataset.key_column or dataset.id_column} values in the manifest: {shown}{more}"
        )
    if dataset.key_column and dataset.id_column in columns:
        check_own_ids(conn, dataset)
    return int(counts[0])


def check_own_ids(conn: psycopg.Connection, dataset: Dataset) -> None:
    """Rows matched by key whose ids are a column of the source's own (a WebDataset with
    --id-column): every row has one, given once, and not already the id of another key."""
    ids, key = sql.Identifier(dataset.id_column), sql.Identifier(dataset.key_column or "")
    name = dataset.id_column
    empty = conn.execute(sql.SQL("SELECT count(*) FROM load WHERE {} IS NULL").format(ids)).fetchone()
    if empty and empty[0]:
        raise UserError(f"{empty[0]} rows have no {name} (no parquet row for their key, or an empty {name})")
    twice = conn.execute(
        sql.SQL("SELECT {i} FROM load GROUP BY {i} HAVING count(*) > 1 LIMIT %s").format(i=ids), (SHOWN_IDS,)
    ).fetchall()
    if twice:
        values = ", ".join(str(row[0]) for row in twice)
        raise UserError(f"{name} is not unique: {values} given twice or more")
    taken = conn.execute(
        sql.SQL(
            "SELECT l.{i}, c.{k} FROM load l JOIN {t} c ON c.{i} = l.{i} WHERE c.{k} <> l.{k}"
            " ORDER BY 1 LIMIT %s"
        ).format(i=ids, k=key, t=dataset.table),
        (SHOWN_IDS,),
    ).fetchall()
    if taken:
        shown = ", ".join(f"{value} (of {other!r})" for value, other in taken)
        raise UserError(f"{name} is not unique: already the id of another key: {shown}")


def add_catalog_rows(conn: psycopg.Connection, dataset: Dataset, columns: Sequence[str]) -> int:
    """Insert `load`'s rows that are new to the catalog; how many were. String keys get their ids
    in the order the rows were loaded (a shard's members: offset order, so id order is storage
    order)."""
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    in_order = sql.SQL(" ORDER BY ctid" if dataset.key_column else "")  # a fresh table: load order
    cursor = conn.execute(
        sql.SQL("INSERT INTO {} ({n}) SELECT {n} FROM load{o} ON CONFLICT ({m}) DO NOTHING").format(
            dataset.table, n=names, o=in_order, m=match_column(dataset)
        )
    )
    return cursor.rowcount


def add_object_locations(
    conn: psycopg.Connection, dataset: Dataset, image_column: str, settings: Settings
) -> None:
    """Each `load` row's image is the object its `image_column` names (an s3:// URI); a row with
    none, with something else, or in a bucket sources may not come from (SOURCE_BUCKETS) gets a
    location that says so (its items fail, unread)."""
    image = sql.Identifier(image_column)
    named, all_but = settings.source_rule
    conn.execute(
        sql.SQL(
            """INSERT INTO locations (dataset, id, uri, error)
               SELECT %(dataset)s, c.{id}, CASE WHEN l.{image} ~ %(uri)s AND b.allowed THEN l.{image} END,
                      CASE WHEN l.{image} IS NULL THEN %(none)s
                           WHEN l.{image} !~ %(uri)s
                           THEN 'not an s3://bucket/key URI: ' || left(l.{image}, 200)
                           WHEN NOT b.allowed
                           THEN 'bucket ' || b.name || ' is not a source Quarry may read (SOURCE_BUCKETS)'
                      END
               FROM load l JOIN {table} c ON c.{match} = l.{match},
               LATERAL (SELECT substring(l.{image} FROM '^s3://([^/]+)/') AS name) n,
               LATERAL (SELECT n.name AS name, n.name = ANY(%(named)s)
                               OR n.name IS DISTINCT FROM %(all_but)s AND %(all_but)s IS NOT NULL
                               AS allowed) b
               ON CONFLICT DO NOTHING"""
        ).format(
            id=sql.Identifier(dataset.id_column),
            image=image,
            table=dataset.table,
            match=match_column(dataset),
        ),
        {
            "dataset": dataset.id,
            "uri": S3_URI,
            "none": f"no image location (column {image_column} is empty)",
            "named": named,
            "all_but": all_but,
        },
    )


def add_shard(conn: psycopg.Connection, uri: str, size: int, etag: str) -> int:
    """Record a tar shard; its id."""
    row = conn.execute(
        "INSERT INTO shards (uri, size, etag) VALUES (%s, %s, %s)"
        " ON CONFLICT (uri) DO UPDATE SET size = EXCLUDED.size, etag = EXCLUDED.etag RETURNING id",
        (uri, size, etag),
    ).fetchone()
    assert row is not None
    return int(row[0])


def load_members(conn: psycopg.Connection, dataset: Dataset, members: Sequence[Member]) -> None:
    """COPY a shard's image members into the temporary table `members`."""
    match_type = "text" if dataset.key_column else "bigint"
    conn.execute("DROP TABLE IF EXISTS pg_temp.members")
    conn.execute(
        f"CREATE TEMP TABLE members (match {match_type}, byte_offset bigint, byte_length bigint,"
        " width integer, height integer) ON COMMIT DROP"
    )
    with conn.cursor().copy("COPY members FROM STDIN") as copy:
        for m in members:
            copy.write_row((m.match, m.offset, m.length, m.width, m.height))


def add_member_locations(conn: psycopg.Connection, dataset: Dataset, shard: int) -> int:
    """Each image of `members` is at its byte range of `shard`; how many were new. With string
    keys the catalog gives each key's id; integer ids are the members' own (an image may come
    before its catalog row)."""
    source: sql.Composable
    image_id: sql.Composable
    if dataset.key_column:
        source = sql.SQL("members m JOIN {} c ON c.{} = m.match").format(dataset.table, match_column(dataset))
        image_id = sql.SQL("c.{}").format(sql.Identifier(dataset.id_column))
    else:
        source, image_id = sql.SQL("members m"), sql.SQL("m.match")
    cursor = conn.execute(
        sql.SQL(
            """INSERT INTO locations (dataset, id, shard, byte_offset, byte_length, width, height)
               SELECT %s, {id}, %s, m.byte_offset, m.byte_length, m.width, m.height FROM {source}
               ON CONFLICT (dataset, id) DO UPDATE SET shard = EXCLUDED.shard,
                   byte_offset = EXCLUDED.byte_offset, byte_length = EXCLUDED.byte_length,
                   width = EXCLUDED.width, height = EXCLUDED.height,
                   uri = NULL, etag = NULL, error = NULL
               WHERE locations.error IS NOT NULL"""
        ).format(id=image_id, source=source),
        (dataset.id, shard),
    )
    return cursor.rowcount


def add_bad_images(conn: psycopg.Connection, dataset: Dataset, errors: dict[int, str]) -> None:
    """Images found unreadable at ingest: a location that says why (their items fail)."""
    conn.execute(
        """INSERT INTO locations (dataset, id, error)
           SELECT %s, e.id, e.error FROM unnest(%s::bigint[], %s::text[]) AS e (id, error)
           ON CONFLICT (dataset, id) DO UPDATE SET error = EXCLUDED.error, shard = NULL, uri = NULL,
               byte_offset = NULL, byte_length = NULL, etag = NULL""",
        (dataset.id, list(errors), list(errors.values())),
    )
