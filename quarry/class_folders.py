"""A folder of class folders (torchvision's ImageFolder, Keras' image_dataset_from_directory), or
of images by any name: `photos/train/shoes/IMG_4001.JPG` becomes a row with `label` (the image's
parent folder; none for an image at the top or right under a split), `file` (its path below the
folder: the key a re-ingest matches on) and, when every first-level folder is a split (train,
val, test, ...), `split`; Quarry assigns the ids. The images are packed into shards as a folder
of `{id}.jpg` is (quarry/packing.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pyarrow as pa
from psycopg import sql

from common.datasets import register_dataset
from common.errors import UserError
from common.ingest.register import add_catalog_rows, load_rows
from common.ingest.summary import IngestSummary
from common.ingest.tables import create_catalog
from common.storage import ObjectStore
from quarry.packing import forget_lost_shards, pack_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}  # any case
SPLITS = {"train", "training", "val", "valid", "validation", "dev", "test", "testing"}
ID_COLUMN = "id"  # assigned by Quarry
KEY_COLUMN = "file"
ROWS_PER_BATCH = 50_000


@dataclass(frozen=True)
class ClassImage:
    file: str  # posix path below the folder
    label: str | None
    split: str | None


def holds_images(folder: Path) -> bool:
    """Whether there is an image file anywhere below `folder` (looked for until the first)."""
    return next(images_below(folder), None) is not None


def is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def images_below(folder: Path) -> Iterator[Path]:
    """The image files in `folder` and its sub-folders, in path order (hidden entries skipped)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_image(name):
                yield Path(root) / name


def first_level(folder: Path) -> list[str]:
    return [entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")]


def describe(folder: Path, path: Path, splits: bool) -> ClassImage:
    """The row of one image: its parent folder is its label (none for an image right under a
    split folder), its first folder its split when the folder is split."""
    parts = path.relative_to(folder).parts
    split = parts[0] if splits and len(parts) > 1 else None
    label = parts[-2] if len(parts) > (2 if split else 1) else None
    return ClassImage("/".join(parts), label, split)


def ingest_class_folders(
    conn: psycopg.Connection,
    store: ObjectStore,
    folder: Path,
    name: str,
    raw_bucket: str,
    concurrency: int,
    summary: IngestSummary,
    on_progress: Callable[[IngestSummary], None],
) -> None:
    """Register the rows of every image below the class folders (those already there are kept:
    the `file` key matches), then pack the images not registered yet."""
    splits = bool(levels := first_level(folder)) and all(level.lower() in SPLITS for level in levels)
    columns = {"label": "text", KEY_COLUMN: "text"} | ({"split": "text"} if splits else {})
    summary.unrecognised_files += sum(
        1 for entry in os.scandir(folder) if entry.is_file() and not is_image(entry.name)
    )
    summary.dataset = name
    with conn.transaction():
        create_catalog(conn, name, columns, ID_COLUMN, KEY_COLUMN)
        dataset = register_dataset(conn, name, ID_COLUMN, KEY_COLUMN, None, "classes")
        rows = (describe(folder, path, splits) for path in images_below(folder))
        summary.rows = load_rows(conn, dataset, list(columns), batches(rows, splits))
        if not summary.rows:
            raise UserError(f"{folder}: no images (.jpg, .jpeg, .png, .webp) in it or its sub-folders")
        add_catalog_rows(conn, dataset, list(columns))
    store.ensure_bucket(raw_bucket)
    forget_lost_shards(conn, store, dataset)
    files = registered_files(conn, name, folder)
    by_id = replace(dataset, key_column=None)  # the packed members are named by the ids just given
    pack_images(conn, store, by_id, iter(files), raw_bucket, concurrency, summary, on_progress)


def batches(rows: Iterator[ClassImage], splits: bool) -> Iterator[pa.RecordBatch]:
    """The rows as record batches of the catalog's columns."""
    chunk: list[ClassImage] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == ROWS_PER_BATCH:
            yield record_batch(chunk, splits)
            chunk = []
    if chunk:
        yield record_batch(chunk, splits)


def record_batch(rows: list[ClassImage], splits: bool) -> pa.RecordBatch:
    data = {"label": [r.label for r in rows], KEY_COLUMN: [r.file for r in rows]}
    if splits:
        data["split"] = [r.split for r in rows]
    return pa.RecordBatch.from_pydict(data)


def registered_files(conn: psycopg.Connection, name: str, folder: Path) -> list[tuple[int, Path]]:
    """(id, path) of every row of the dataset, in id order (storage order is id order); the
    paths are held, as a folder's names are (about 100 bytes a file)."""
    query = sql.SQL("SELECT {}, {} FROM {} ORDER BY 1").format(
        sql.Identifier(ID_COLUMN), sql.Identifier(KEY_COLUMN), sql.Identifier(name)
    )
    return [(image_id, folder / file) for image_id, file in conn.execute(query)]
