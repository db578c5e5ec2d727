"""`producer ingest`: register a dataset where its images are, or pack a local folder once.

SOURCE is the fashion archive's folder (`styles.csv` + `images/`, its quirks repaired), a folder
of `{id}.jpg` images, a manifest (CSV, JSON Lines, Parquet: a local file or an s3:// object or
prefix) whose rows locate their images by s3:// URI, or an s3:// prefix of WebDataset tar
shards. The catalog becomes a table named like the dataset; see docs/datasets.md.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

import psycopg
import pyarrow as pa
from psycopg import sql

from common.catalog import COLUMNS, CatalogStats, RejectedLine, read_styles
from common.datasets import FASHION, Dataset, check_name, register_dataset
from common.errors import UserError
from common.storage import ObjectStore
from quarry.manifest import BadLines, format_of, local_copy, manifest_sources, read_batches
from quarry.packing import forget_lost_shards, pack_images
from quarry.register import add_catalog_rows, add_object_locations, load_rows
from quarry.summary import IngestSummary
from quarry.tables import check_column_types, create_catalog, table_columns
from quarry.webdataset import KEY_COLUMN, ingest_webdataset

log = logging.getLogger(__name__)

IMAGE_NAME = re.compile(r"^(\d+)\.(jpe?g|png|webp)$", re.IGNORECASE)
REJECTED_SHOWN = 20  # malformed CSV lines printed one by one before only counting
FORMATS = ("kaggle", "folder", "csv", "jsonl", "parquet", "webdataset")
LISTED_TO_INFER = 1000  # objects of an s3:// prefix looked at to tell its format (one LIST page)
ASSIGNED_ID = "id"  # the column of the ids Quarry assigns to string keys


@dataclass(frozen=True)
class IngestRequest:
    """What to ingest and how its rows name and locate their images."""

    source: str
    dataset: str | None = None  # default: `styles` for the fashion archive, else required
    id_column: str | None = None  # integers, or string keys (Quarry assigns integer ids)
    image_column: str | None = None  # manifests: the column of each image's s3:// URI
    source_format: str | None = None  # one of FORMATS; inferred from SOURCE when None
    column_types: dict[str, str] = field(default_factory=dict)  # column -> PostgreSQL type


def ingest(
    conn: psycopg.Connection,
    store: ObjectStore,
    request: IngestRequest,
    raw_bucket: str,
    concurrency: int,
    on_progress: Callable[[IngestSummary], None] = lambda summary: None,
) -> IngestSummary:
    """Ingest one SOURCE (re-runnable: what was registered before is skipped)."""
    source_format = request.source_format or infer_format(store, request.source)
    if source_format not in FORMATS:
        raise UserError(f"--format {source_format!r}: one of {', '.join(FORMATS)}")
    summary = IngestSummary()
    if source_format == "kaggle":
        ingest_fashion(conn, store, Path(request.source), raw_bucket, concurrency, summary, on_progress)
    elif source_format == "folder":
        ingest_folder(conn, store, request, raw_bucket, concurrency, summary, on_progress)
    elif source_format == "webdataset":
        name = dataset_name(request)
        if request.id_column not in (None, KEY_COLUMN):
            raise UserError(f"a WebDataset's samples are named by their {KEY_COLUMN!r}: drop --id-column")
        overrides = check_column_types(request.column_types)
        ingest_webdataset(conn, store, request.source, name, overrides, summary, on_progress)
    else:
        ingest_manifest(conn, store, request, source_format, summary)
    summary.dataset = summary.dataset or dataset_name(request)
    summary.missing = count_missing(conn, summary.dataset)
    return summary.finish()


def infer_format(store: ObjectStore, source: str) -> str:
    """The format SOURCE looks like; UserError when it says nothing."""
    if source.startswith("s3://"):
        if format_of(source):
            return str(format_of(source))
        first = [uri for uri, _, _ in islice(store.list_objects(source), LISTED_TO_INFER)]
        if any(uri.endswith(".tar") for uri in first):
            return "webdataset"  # tars, maybe with their parquet tables beside them
        for uri in first:
            if format_of(uri):
                return str(format_of(uri))
        raise UserError(f"{source}: no .tar shards or manifest files (.csv, .jsonl, .parquet) there")
    path = Path(source)
    if path.is_dir():
        return "kaggle" if (path / "styles.csv").is_file() else "folder"
    if path.is_file() and format_of(path.name):
        return str(format_of(path.name))
    if not path.exists():
        raise UserError(f"{source}: no such file or folder")
    raise UserError(f"{source}: cannot tell its format from its name; give --format")


def dataset_name(request: IngestRequest) -> str:
    if request.dataset:
        return check_name(request.dataset)
    raise UserError(
        f"{request.source}: name the dataset with --dataset (it becomes the catalog table's name)"
    )


def ingest_fashion(
    conn: psycopg.Connection,
    store: ObjectStore,
    folder: Path,
    raw_bucket: str,
    concurrency: int,
    summary: IngestSummary,
    on_progress: Callable[[IngestSummary], None],
) -> None:
    """The Kaggle archive: styles.csv into `styles` (quirks repaired), images/ packed into shards."""
    csv_path, images_dir = folder / "styles.csv", folder / "images"
    if not csv_path.is_file():
        raise UserError(f"dataset {folder}: no styles.csv")
    if not images_dir.is_dir():
        raise UserError(f"dataset {folder}: no images/ folder")
    summary.dataset = FASHION
    with conn.transaction():
        dataset = register_dataset(conn, FASHION, "id", None, None, "kaggle")
    load_styles(conn, csv_path, summary)
    store.ensure_bucket(raw_bucket)
    forget_lost_shards(conn, store, dataset)
    pack_images(
        conn, store, dataset, scan_images(images_dir, summary), raw_bucket, concurrency, summary, on_progress
    )


def ingest_folder(
    conn: psycopg.Connection,
    store: ObjectStore,
    request: IngestRequest,
    raw_bucket: str,
    concurrency: int,
    summary: IngestSummary,
    on_progress: Callable[[IngestSummary], None],
) -> None:
    """A folder of `{id}.jpg` images without a table: the catalog is (id, file)."""
    name = dataset_name(request)
    summary.dataset = name
    columns = {"id": "bigint", "file": "text"}
    with conn.transaction():
        create_catalog(conn, name, columns, "id", None)
        dataset = register_dataset(conn, name, "id", None, None, "folder")
        files = list(scan_images(Path(request.source), summary))
        table = pa.table(
            {"id": pa.array([i for i, _ in files], pa.int64()), "file": [p.name for _, p in files]}
        )
        summary.rows = load_rows(conn, dataset, list(columns), table.to_batches())
        add_catalog_rows(conn, dataset, list(columns))
    store.ensure_bucket(raw_bucket)
    forget_lost_shards(conn, store, dataset)
    pack_images(conn, store, dataset, iter(files), raw_bucket, concurrency, summary, on_progress)


def ingest_manifest(
    conn: psycopg.Connection,
    store: ObjectStore,
    request: IngestRequest,
    source_format: str,
    summary: IngestSummary,
) -> None:
    """Rows of one or more manifest files, each image an object where it is (nothing copied);
    each file registers whole, in one transaction, or not at all."""
    name = dataset_name(request)
    if not request.id_column:
        raise UserError("name the manifest's id column with --id-column")
    if not request.image_column:
        raise UserError("name the column of each image's s3:// URI with --image-column")
    overrides = check_column_types(request.column_types)
    sources = manifest_sources(store, request.source)
    if not sources:
        raise UserError(f"{request.source}: no manifest files (.csv, .jsonl, .parquet) there")
    summary.dataset = name
    dataset: Dataset | None = None
    for source in sources:
        bad = BadLines()
        with local_copy(store, source) as path:
            batches = read_batches(path, source, format_of(source) or source_format, set(overrides), bad)
            first = next(batches, None)
            if first is None:
                summary.report(f"{source}: no rows")
                continue
            with conn.transaction():
                dataset = dataset or manifest_dataset(conn, name, request, first.schema, overrides, source)
                rows = load_rows(conn, dataset, first.schema.names, chain([first], batches))
                added = add_catalog_rows(conn, dataset, first.schema.names)
                add_object_locations(conn, dataset, request.image_column)
        summary.rows += rows
        summary.images += added
        summary.present += rows - added
        summary.rejected += bad.count
        summary.problems.extend(bad.shown)


def manifest_dataset(
    conn: psycopg.Connection,
    name: str,
    request: IngestRequest,
    schema: pa.Schema,
    overrides: dict[str, str],
    source: str,
) -> Dataset:
    """The dataset's table from the first manifest's columns; string keys get assigned ids."""
    assert request.id_column and request.image_column
    for column in (request.id_column, request.image_column):
        if column not in schema.names:
            raise UserError(f"manifest {source}: no column {column!r} (columns: {', '.join(schema.names)})")
    id_type = schema.field(request.id_column).type
    keyed = request.id_column not in overrides and not pa.types.is_integer(id_type)
    if keyed and not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise UserError(
            f"manifest {source}: id column {request.id_column!r} is {id_type}, not integers or strings"
        )
    if keyed and ASSIGNED_ID in schema.names:
        raise UserError(
            f"manifest {source}: string keys get Quarry-assigned ids in a column {ASSIGNED_ID!r},"
            " and the manifest has one: rename it"
        )
    columns = table_columns(schema, overrides)
    id_column = ASSIGNED_ID if keyed else request.id_column
    key_column = request.id_column if keyed else None
    create_catalog(conn, name, columns, id_column, key_column)
    return register_dataset(
        conn, name, id_column, key_column, request.image_column, format_of(source) or "manifest"
    )


def count_missing(conn: psycopg.Connection, name: str) -> int:
    """Catalog rows of the dataset with no location at all."""
    row = conn.execute("SELECT id, id_column FROM datasets WHERE name = %s", (name,)).fetchone()
    if row is None:
        return 0
    found = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {} c WHERE NOT EXISTS"
            " (SELECT FROM locations l WHERE l.dataset = %s AND l.id = c.{})"
        ).format(sql.Identifier(name), sql.Identifier(row[1])),
        (row[0],),
    ).fetchone()
    return int(found[0]) if found else 0


def load_styles(conn: psycopg.Connection, csv_path: Path, summary: IngestSummary) -> None:
    """Stream styles.csv through COPY into a temporary table, then upsert into `styles`."""
    stats = CatalogStats()
    columns = ", ".join(COLUMNS)
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE styles_load (line integer, LIKE styles) ON COMMIT DROP")
        with conn.cursor().copy(f"COPY styles_load (line, {columns}) FROM STDIN") as copy:
            for order, row in enumerate(read_styles(csv_path, stats)):
                if isinstance(row, RejectedLine):
                    if stats.rejected <= REJECTED_SHOWN:
                        log.warning("styles.csv line %d skipped: %s", row.line_number, row.reason)
                    continue
                copy.write_row((order, *row))
        distinct = conn.execute("SELECT count(DISTINCT id) FROM styles_load").fetchone()[0]  # type: ignore[index]
        updates = ", ".join(f"{column} = EXCLUDED.{column}" for column in COLUMNS[1:])
        conn.execute(
            f"INSERT INTO styles ({columns})"
            f" SELECT DISTINCT ON (id) {columns} FROM styles_load ORDER BY id, line DESC"
            f" ON CONFLICT (id) DO UPDATE SET {updates}"
        )
    summary.rows, summary.repaired, summary.rejected = stats.rows, stats.repaired, stats.rejected
    summary.duplicate_ids = stats.rows - distinct


def scan_images(images_dir: Path, summary: IngestSummary) -> Iterator[tuple[int, Path]]:
    """Stream (id, path) of `{id}.jpg`-style files, counting the others."""
    with os.scandir(images_dir) as entries:
        for entry in entries:
            match = IMAGE_NAME.match(entry.name)
            if match and entry.is_file():
                yield int(match.group(1)), Path(entry.path)
            else:
                summary.unrecognised_files += 1
                log.warning("ignoring %s: not named {id}.jpg", entry.path)
