"""Rows that name image files on this machine: a folder with a metadata file beside its images
(Hugging Face's `imagefolder`: `metadata.csv`, `.jsonl` or `.parquet`, whose `file_name` is each
image's path below the folder), or a local manifest whose image column holds paths (absolute, or
relative to the manifest). The rows' columns become the catalog's; the images they name are
packed into shards as a folder's are (quarry/packing.py). A named file that is missing is a
recorded failure of its row (its items fail with why); in a metadata folder, an image no row
names is counted as ignored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import psycopg
import pyarrow as pa
from psycopg import sql

from common.datasets import Dataset, register_dataset
from common.errors import UserError
from common.ingest.manifest import BadLines, format_of, read_batches
from common.ingest.register import add_bad_images, add_catalog_rows, load_rows
from common.ingest.summary import IngestSummary
from common.ingest.tables import create_catalog, table_columns
from common.storage import ObjectStore
from quarry.class_folders import images_below
from quarry.packing import forget_lost_shards, pack_images

METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
FILE_NAME = "file_name"  # Hugging Face's column naming each image
ASSIGNED_ID = "id"  # the column of the ids Quarry assigns
MISSING_REPORTED = 5  # missing files named one by one in the summary


@dataclass(frozen=True)
class LocalRows:
    """A table whose rows name local image files."""

    table: Path  # the metadata file or manifest
    base: Path  # what a relative image path is relative to
    image_column: str
    id_column: str | None  # the rows' ids (integers) or keys (strings); None: `image_column` is the key
    source_format: str  # recorded on the dataset
    overrides: dict[str, str] = field(default_factory=dict)  # column -> PostgreSQL type
    unnamed_counted: bool = False  # count the folder's images no row names (a metadata folder)


def metadata_file(folder: Path) -> Path | None:
    """The folder's metadata file, if it has one."""
    return next((folder / name for name in METADATA_NAMES if (folder / name).is_file()), None)


def metadata_rows(folder: Path) -> LocalRows:
    """A metadata folder's rows; UserError without a metadata file."""
    folder = folder.resolve()
    table = metadata_file(folder)
    if table is None:
        raise UserError(f"{folder}: no {', '.join(METADATA_NAMES)} in it")
    return LocalRows(table, folder, FILE_NAME, None, "imagefolder", unnamed_counted=True)


def local_path(base: Path, value: str) -> Path:
    return Path(value) if Path(value).is_absolute() else base / value


def ingest_local_rows(
    conn: psycopg.Connection,
    store: ObjectStore,
    rows: LocalRows,
    name: str,
    raw_bucket: str,
    concurrency: int,
    summary: IngestSummary,
    on_progress: Callable[[IngestSummary], None],
) -> None:
    """Register the rows (rows already there are kept: their id or key matches), then pack the
    images they name that are not registered yet."""
    bad = BadLines()
    batches = read_batches(
        rows.table, str(rows.table), str(format_of(rows.table.name)), set(rows.overrides), bad
    )
    first = next(batches, None)
    if first is None:
        raise UserError(f"{rows.table}: no rows")
    id_column, key_column = ids_of(rows, first.schema)
    columns = table_columns(first.schema, rows.overrides)
    summary.dataset = name
    with conn.transaction():
        create_catalog(conn, name, columns, id_column, key_column)
        dataset = register_dataset(conn, name, id_column, key_column, None, rows.source_format)
        summary.rows = load_rows(conn, dataset, list(columns), [first, *batches])
        add_catalog_rows(conn, dataset, list(columns))
    summary.rejected += bad.count
    for line in bad.shown:
        summary.report(line)
    files, missing = named_files(conn, dataset, rows)
    record_missing(conn, dataset, missing, summary)
    if rows.unnamed_counted:
        named = {path for _, path in files}
        summary.unrecognised_files += sum(path not in named for path in images_below(rows.base))
    store.ensure_bucket(raw_bucket)
    forget_lost_shards(conn, store, dataset)
    by_id = replace(dataset, key_column=None)  # the packed members are named by their ids
    pack_images(conn, store, by_id, iter(files), raw_bucket, concurrency, summary, on_progress)


def ids_of(rows: LocalRows, schema: pa.Schema) -> tuple[str, str | None]:
    """(id column, key column) of the catalog: the rows' own integer ids, else ids Quarry assigns
    to their keys (the id column's strings, or the image paths); UserError for a column missing."""
    for column in (rows.image_column, rows.id_column):
        if column is not None and column not in schema.names:
            raise UserError(
                f"{rows.table}: no column {column!r} naming each image (columns: {', '.join(schema.names)})"
                if column == rows.image_column
                else f"{rows.table}: no column {column!r} (columns: {', '.join(schema.names)})"
            )
    if rows.id_column is not None and (
        rows.id_column in rows.overrides or pa.types.is_integer(schema.field(rows.id_column).type)
    ):
        return rows.id_column, None
    if ASSIGNED_ID in schema.names:
        raise UserError(
            f"{rows.table}: Quarry assigns ids in a column {ASSIGNED_ID!r}, and it has one: rename it"
        )
    return ASSIGNED_ID, rows.id_column or rows.image_column


def named_files(
    conn: psycopg.Connection, dataset: Dataset, rows: LocalRows
) -> tuple[list[tuple[int, Path]], dict[int, str]]:
    """(id, path) of every row whose image is a file, in id order; why each other row has none."""
    query = sql.SQL("SELECT {}, {} FROM {} ORDER BY 1").format(
        sql.Identifier(dataset.id_column), sql.Identifier(rows.image_column), dataset.table
    )
    files: list[tuple[int, Path]] = []
    missing: dict[int, str] = {}
    for image_id, value in conn.execute(query):
        path = local_path(rows.base, str(value)) if value else None
        if path is None:
            missing[image_id] = f"no image location (column {rows.image_column} is empty)"
        elif not path.is_file():
            missing[image_id] = f"no such file: {path}"
        else:
            files.append((image_id, path))
    return files, missing


def record_missing(
    conn: psycopg.Connection, dataset: Dataset, missing: dict[int, str], summary: IngestSummary
) -> None:
    """The rows whose file is missing get a location that says so (their items fail), unless an
    earlier run packed their image (the file left afterwards: the packed image stands)."""
    if not missing:
        return
    packed = {
        row[0]
        for row in conn.execute(
            "SELECT id FROM locations WHERE dataset = %s AND id = ANY (%s) AND error IS NULL",
            (dataset.id, list(missing)),
        )
    }
    errors = {image_id: why for image_id, why in missing.items() if image_id not in packed}
    if errors:
        with conn.transaction():
            add_bad_images(conn, dataset, errors)
        summary.bad += len(errors)
        for why in list(errors.values())[:MISSING_REPORTED]:
            summary.report(why)
