"""A folder of images with a metadata file beside them (Hugging Face's `imagefolder`):
`metadata.csv`, `metadata.jsonl` or `metadata.parquet`, whose `file_name` column is each image's
path relative to the folder. Its columns become the catalog's, `file_name` the key a re-ingest
matches on, ids assigned by Quarry; the images it names are packed as a folder's are. A named
file that is missing is a recorded failure of its row; an image no row names is counted as
ignored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psycopg
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
KEY_COLUMN = "file_name"  # Hugging Face's name for it
ID_COLUMN = "id"  # assigned by Quarry


def metadata_file(folder: Path) -> Path | None:
    """The folder's metadata file, if it has one."""
    return next((folder / name for name in METADATA_NAMES if (folder / name).is_file()), None)


def ingest_metadata_folder(
    conn: psycopg.Connection,
    store: ObjectStore,
    folder: Path,
    name: str,
    raw_bucket: str,
    concurrency: int,
    summary: IngestSummary,
    on_progress: Callable[[IngestSummary], None],
) -> None:
    """Register the metadata's rows (rows already there are kept: `file_name` matches), then pack
    the images they name that are not registered yet."""
    folder = folder.resolve()
    metadata = metadata_file(folder)
    assert metadata is not None
    source_format = str(format_of(metadata.name))
    bad = BadLines()
    batches = read_batches(metadata, str(metadata), source_format, set(), bad)
    first = next(batches, None)
    if first is None:
        raise UserError(f"{metadata}: no rows")
    if KEY_COLUMN not in first.schema.names:
        names = ", ".join(first.schema.names)
        raise UserError(f"{metadata}: no column {KEY_COLUMN!r} naming each image (columns: {names})")
    if ID_COLUMN in first.schema.names:
        raise UserError(
            f"{metadata}: Quarry assigns ids in a column {ID_COLUMN!r}, and the file has one: rename it"
        )
    columns = table_columns(first.schema, {})
    summary.dataset = name
    with conn.transaction():
        create_catalog(conn, name, columns, ID_COLUMN, KEY_COLUMN)
        dataset = register_dataset(conn, name, ID_COLUMN, KEY_COLUMN, None, "imagefolder")
        summary.rows = load_rows(conn, dataset, list(columns), [first, *batches])
        add_catalog_rows(conn, dataset, list(columns))
    summary.rejected += bad.count
    for line in bad.shown:
        summary.report(line)
    files, missing = named_files(conn, name, folder)
    record_missing(conn, dataset, missing, summary)
    named = {path for _, path in files}
    summary.unrecognised_files += sum(path not in named for path in images_below(folder))
    store.ensure_bucket(raw_bucket)
    forget_lost_shards(conn, store, dataset)
    by_id = replace(dataset, key_column=None)  # the packed members are named by the ids given
    pack_images(conn, store, by_id, iter(files), raw_bucket, concurrency, summary, on_progress)


def named_files(
    conn: psycopg.Connection, name: str, folder: Path
) -> tuple[list[tuple[int, Path]], dict[int, str]]:
    """(id, path) of every row whose `file_name` is a file of the folder, in id order; and why
    each other row has none (missing, or a path that would leave the folder)."""
    query = sql.SQL("SELECT {}, {} FROM {} ORDER BY 1").format(
        sql.Identifier(ID_COLUMN), sql.Identifier(KEY_COLUMN), sql.Identifier(name)
    )
    files: list[tuple[int, Path]] = []
    missing: dict[int, str] = {}
    for image_id, file_name in conn.execute(query):
        path = folder / str(file_name)
        if not path.resolve().is_relative_to(folder):
            missing[image_id] = f"file_name {file_name!r} is not a path inside {folder}"
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
        for why in list(errors.values())[:5]:
            summary.report(why)
