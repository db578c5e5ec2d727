"""Registering WebDataset shards where they are (img2dataset's layout: `NNNNN.tar` with
`NNNNN.parquet` beside it): each tar's members indexed from its headers in one sequential read,
its images located by byte range, its parquet rows joined by key. Nothing is copied."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from common.datasets import Dataset, dataset_names, get_dataset, register_dataset
from common.errors import UserError
from common.ingest.manifest import local_copy
from common.ingest.register import (
    Member,
    add_catalog_rows,
    add_member_locations,
    add_shard,
    load_members,
    load_rows,
)
from common.ingest.summary import IngestSummary
from common.ingest.tables import create_catalog, table_columns
from common.ingest.tar_index import IMAGE_EXTENSIONS, TarMember, index_tar
from common.storage import ObjectStore

log = logging.getLogger(__name__)

KEY_COLUMN = "key"  # img2dataset's (and WebDataset's) name for a sample's key
ASSIGNED_ID = "id"  # the column of the ids Quarry assigns to keys
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def plan_webdataset(
    conn: psycopg.Connection,
    store: ObjectStore,
    prefix: str,
    name: str,
    id_column: str | None,
    overrides: dict[str, str],
    summary: IngestSummary,
) -> tuple[Dataset, list[tuple[str, int, str, str | None]]]:
    """The dataset (its table from the first shard's parquet columns; an existing one must have
    the same) and the tars under an s3:// prefix still to register: (uri, size, ETag, its
    parquet's uri or None). Compressed tars are reported; tars registered before are counted and
    left out. `id_column`: an integer column of the parquet to use as ids (else ids are assigned)."""
    listed = list(store.list_objects(prefix))
    tars = [(uri, size, etag) for uri, size, etag in listed if uri.endswith(".tar")]
    for uri, _, _ in listed:
        if uri.endswith(COMPRESSED_SUFFIXES):
            summary.report(f"{uri}: compressed tar; members can only be read from an uncompressed tar")
    if not tars:
        raise UserError(f"{prefix}: no .tar shards there")
    parquets = {uri[: -len(".parquet")]: uri for uri, _, _ in listed if uri.endswith(".parquet")}
    known = {
        row[0]
        for row in conn.execute("SELECT uri FROM shards WHERE uri = ANY (%s)", ([u for u, _, _ in tars],))
    }
    summary.shards_present = len(known)
    todo = [
        (uri, size, etag, parquets.get(uri[: -len(".tar")])) for uri, size, etag in tars if uri not in known
    ]
    if not todo:
        if name not in dataset_names(conn):
            raise UserError(
                f"{prefix}: its {len(tars)} shards are registered already, by another dataset"
                " (`producer datasets`): one dataset per set of shards"
            )
        return get_dataset(conn, name), todo
    first_table = next(
        (parquets[uri[: -len(".tar")]] for uri, _, _ in tars if uri[: -len(".tar")] in parquets), None
    )
    with conn.transaction():
        dataset = catalog_for(conn, name, read_metadata(store, first_table), id_column, overrides, prefix)
    return dataset, todo


@dataclass(frozen=True)
class IndexedTar:
    """A tar shard read and indexed (its image members, its parquet rows), ready to register."""

    images: list[Member]
    metadata: pa.Table | None


def index_shard(
    store: ObjectStore, uri: str, size: int, companion: str | None, summary: IngestSummary
) -> IndexedTar:
    """Read and index one tar (one sequential read) and its parquet table; ShardUnreadable or
    UserError when it cannot. No database here: an ingest unit does this before its transaction."""
    members = list(index_tar(store.open(uri), size, uri))
    return IndexedTar(image_members(members, uri, summary), read_metadata(store, companion))


def register_tar(
    conn: psycopg.Connection,
    dataset: Dataset,
    uri: str,
    size: int,
    etag: str,
    indexed: IndexedTar,
    summary: IngestSummary,
) -> None:
    """Register an indexed tar's images with their parquet rows, in the caller's transaction;
    UserError (nothing registered) when it cannot."""
    register_shard(conn, dataset, uri, size, etag, indexed.images, indexed.metadata, summary)
    summary.shards += 1


def image_members(members: list[TarMember], uri: str, summary: IngestSummary) -> list[Member]:
    """The first image member of each key; keys with none are counted."""
    images: dict[str, Member] = {}
    keys = set()
    for member in members:
        keys.add(member.key)
        if member.extension in IMAGE_EXTENSIONS and member.key not in images:
            images[member.key] = Member(member.key, member.offset, member.length)
    without = len(keys) - len(images)
    if without:
        summary.members_without_image += without
        log.warning("%s: %d keys without an image member", uri, without)
    return list(images.values())


def read_metadata(store: ObjectStore, uri: str | None) -> pa.Table | None:
    """The shard's parquet table (a shard's is small: its rows only), or None when there is none."""
    if uri is None:
        return None
    with local_copy(store, uri) as path:
        return keyed_table(pq.read_table(path), uri)


def keyed_table(table: pa.Table, where: str) -> pa.Table:
    """A shard's parquet table with its keys as strings; UserError when it has none."""
    if KEY_COLUMN not in table.column_names:
        raise UserError(f"{where}: no {KEY_COLUMN!r} column to join the shard's members by")
    return table.set_column(
        table.column_names.index(KEY_COLUMN), KEY_COLUMN, table[KEY_COLUMN].cast(pa.string())
    )


def catalog_for(
    conn: psycopg.Connection,
    name: str,
    metadata: pa.Table | None,
    id_column: str | None,
    overrides: dict[str, str],
    prefix: str,
) -> Dataset:
    """The dataset's table: `key`, the parquet's columns, and `id` (assigned) unless `id_column`
    names an integer column of the parquet to be the ids."""
    schema = metadata.schema if metadata is not None else pa.schema([(KEY_COLUMN, pa.string())])
    columns = table_columns(schema, overrides)
    own_ids = id_column not in (None, KEY_COLUMN)
    if own_ids:
        check_id_column(schema, str(id_column), columns, prefix)
    ids = str(id_column) if own_ids else ASSIGNED_ID
    create_catalog(conn, name, columns, ids, KEY_COLUMN)
    dataset = register_dataset(conn, name, ids, KEY_COLUMN, None, "webdataset")
    log.info("dataset %s from %s: columns %s", name, prefix, ", ".join(columns))
    return dataset


def check_id_column(schema: pa.Schema, id_column: str, columns: dict[str, str], prefix: str) -> None:
    """--id-column of a WebDataset: an integer column of its parquet tables."""
    if id_column not in schema.names:
        raise UserError(
            f"{prefix}: --id-column {id_column!r} is not a column of the shards' parquet"
            f" (columns: {', '.join(schema.names)})"
        )
    if columns[id_column] not in ("smallint", "integer", "bigint"):
        raise UserError(
            f"{prefix}: --id-column {id_column!r} is {schema.field(id_column).type}, not integers;"
            " leave --id-column out and Quarry assigns ids"
        )


def register_shard(
    conn: psycopg.Connection,
    dataset: Dataset,
    uri: str,
    size: int,
    etag: str,
    images: list[Member],
    metadata: pa.Table | None,
    summary: IngestSummary,
) -> None:
    """One shard's catalog rows (its image keys, joined with their parquet rows) and locations."""
    order = "_quarry_offset"  # members in offset order: the ids assigned follow storage order
    keys = pa.table({KEY_COLUMN: [m.match for m in images], order: [m.offset for m in images]})
    if metadata is not None:
        rows = keys.join(metadata, KEY_COLUMN, join_type="left outer")
        summary.rows_without_member += metadata.num_rows - rows.num_rows
    else:
        rows = keys
    rows = rows.sort_by(order).drop_columns([order])
    columns = rows.column_names
    summary.rows += load_rows(conn, dataset, columns, rows.to_batches())
    added = add_catalog_rows(conn, dataset, columns)
    summary.present += rows.num_rows - added
    load_members(conn, dataset, images)
    summary.images += add_member_locations(conn, dataset, add_shard(conn, uri, size, etag))
