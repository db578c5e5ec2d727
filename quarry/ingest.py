"""`producer ingest`: register a dataset where its images are, or pack a local folder once.

SOURCE is the fashion archive's folder (`styles.csv` + `images/`, its quirks repaired), a folder
of `{id}.jpg` images, a manifest (CSV, JSON Lines, Parquet: a local file or an s3:// object or
prefix) whose rows locate their images by s3:// URI, or WebDataset tar shards (an s3:// prefix,
or a local folder such as img2dataset's output, uploaded as it is). The catalog becomes a table
named like the dataset; see docs/datasets.md.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

from common.catalog import COLUMNS, STYLE_TYPES, CatalogStats, RejectedLine, read_styles
from common.datasets import FASHION, FORMATS, analyze_dataset, check_name, dataset_names, register_dataset
from common.db import first_line
from common.errors import UserError
from common.ingest.manifest import format_of
from common.ingest.register import add_catalog_rows, load_rows
from common.ingest.summary import IngestSummary
from common.ingest.tables import check_column_types, create_catalog
from common.ingest.units import IngestPlan, add_unit_counts
from common.ingest.webdataset import catalog_for, keyed_table
from common.storage import ObjectStore
from quarry.class_folders import holds_images, ingest_class_folders
from quarry.datasets import drop_if_empty
from quarry.ingest_plan import ManifestRequest, first_rows, plan_manifest, plan_shards
from quarry.local_images import LocalRows, ingest_local_rows, local_path, metadata_file, metadata_rows
from quarry.packing import forget_lost_shards, pack_images
from quarry.shard_upload import shard_files, upload_shards

log = logging.getLogger(__name__)

IMAGE_NAME = re.compile(r"^(\d+)\.(jpe?g|png|webp)$", re.IGNORECASE)
REJECTED_SHOWN = 20  # malformed CSV lines printed one by one before only counting
OWN_IDS = {  # formats whose ids are fixed by their layout
    "kaggle": "the fashion archive's ids are styles.csv's id column",
    "folder": "a folder of images takes its ids from the file names ({id}.jpg)",
    "classes": "Quarry assigns the ids of class folders' images (their key is the column `file`)",
    "imagefolder": "Quarry assigns the ids of a metadata file's rows (their key is `file_name`)",
}
OWN_IMAGES = ("kaggle", "folder", "classes", "imagefolder", "webdataset")  # formats holding their images
LISTED_TO_INFER = 1000  # objects of an s3:// prefix looked at to tell its format (one LIST page)


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
    wait: Callable[[str], object] = lambda job_id: None,
) -> IngestSummary:
    """Ingest one SOURCE (re-runnable: what was registered before is skipped). A local folder is
    packed here; a manifest or a WebDataset (a local folder of shards is uploaded as it is first)
    is recorded as an ingest job for the pools, and `wait(job_id)` follows it to its end before
    the counts are read. A dataset this ingest created and left without a row is dropped."""
    if refusal := store.settings.refuse_source(request.source):  # before anything is read there
        raise UserError(refusal)
    source_format = request.source_format or infer_format(store, request.source)
    if source_format not in FORMATS:
        raise UserError(f"--format {source_format!r}: one of {', '.join(FORMATS)}")
    check_options(request, source_format)
    summary = IngestSummary()
    existed = set(dataset_names(conn))
    try:
        if source_format == "kaggle":
            ingest_fashion(conn, store, Path(request.source), raw_bucket, concurrency, summary, on_progress)
        elif source_format == "folder":
            ingest_folder(conn, store, request, raw_bucket, concurrency, summary, on_progress)
        elif source_format == "imagefolder" or (local := local_manifest(store, request, source_format)):
            rows = metadata_rows(Path(request.source)) if source_format == "imagefolder" else local
            assert rows is not None
            name = dataset_name(request)
            ingest_local_rows(conn, store, rows, name, raw_bucket, concurrency, summary, on_progress)
        elif source_format == "classes":
            folder, name = Path(request.source), dataset_name(request)
            ingest_class_folders(conn, store, folder, name, raw_bucket, concurrency, summary, on_progress)
        else:
            plan = plan_through_pools(conn, store, request, source_format, raw_bucket, concurrency, summary)
            if plan is not None:
                summary.job_id = plan.job_id
                wait(plan.job_id)
                add_unit_counts(conn, plan.job_id, summary)
    finally:
        if summary.dataset and summary.dataset not in existed:
            drop_if_empty(conn, summary.dataset)
    summary.dataset = summary.dataset or dataset_name(request)
    summary.missing = count_missing(conn, summary.dataset)
    conn.execute(
        "UPDATE datasets SET source = %s WHERE name = %s", (described(request.source), summary.dataset)
    )
    analyze_dataset(conn, summary.dataset)
    return summary.finish()


def check_options(request: IngestRequest, source_format: str) -> None:
    """UserError for an option this kind of source has no use for (never silently ignored)."""
    if request.id_column and source_format in OWN_IDS:
        raise UserError(f"{request.source}: {OWN_IDS[source_format]}: drop --id-column")
    if request.image_column and source_format in OWN_IMAGES:
        raise UserError(f"{request.source}: it holds its images itself: drop --image-column")


def described(source: str) -> str:
    """SOURCE as `producer datasets` shows it: an s3:// URI as given, a local path made absolute."""
    return source if source.startswith("s3://") else str(Path(source).resolve())


def plan_through_pools(
    conn: psycopg.Connection,
    store: ObjectStore,
    request: IngestRequest,
    source_format: str,
    raw_bucket: str,
    concurrency: int,
    summary: IngestSummary,
) -> IngestPlan | None:
    """Record the ingest job of a manifest or a WebDataset; None when nothing is new."""
    name = dataset_name(request)
    summary.dataset = name
    overrides = check_column_types(request.column_types)
    job_id = str(uuid.uuid4())
    if source_format == "webdataset":
        prefix = request.source
        if not prefix.startswith("s3://"):
            with conn.transaction():  # a dataset's columns are checked before anything is uploaded
                catalog_for(conn, name, local_metadata(Path(prefix)), request.id_column, overrides, prefix)
            prefix = upload_shards(conn, store, Path(prefix), raw_bucket, name, concurrency, summary)
        return plan_shards(conn, store, prefix, name, request.id_column, overrides, job_id, summary)
    if not request.id_column:
        raise UserError("name the manifest's id column with --id-column")
    if not request.image_column:
        raise UserError("name the column of each image's s3:// URI with --image-column")
    wanted = ManifestRequest(name, request.id_column, request.image_column, overrides)
    return plan_manifest(conn, store, request.source, wanted, raw_bucket, job_id, summary)


def local_manifest(store: ObjectStore, request: IngestRequest, source_format: str) -> LocalRows | None:
    """A manifest file on this machine whose first rows' images are files here, not s3:// URIs
    (paths absolute or relative to the manifest): its rows, to pack; None for any other source."""
    path = Path(request.source)
    if (
        source_format not in ("csv", "jsonl", "parquet")
        or request.source.startswith("s3://")
        or not path.is_file()
    ):
        return None
    if not request.id_column or not request.image_column:
        return None  # plan_through_pools says which is missing
    overrides = check_column_types(request.column_types)
    _, first = first_rows(store, source_format, str(path), set(overrides), request.image_column)
    if request.image_column not in first.schema.names:
        return None  # manifest_dataset says so
    values = [v for v in first.column(request.image_column).to_pylist() if isinstance(v, str) and v]
    base = path.resolve().parent
    if not values or any(v.startswith("s3://") for v in values):
        return None
    if not any(local_path(base, v).is_file() for v in values):
        return None  # check_sources refuses it in one line
    return LocalRows(path.resolve(), base, request.image_column, request.id_column, source_format, overrides)


def local_metadata(folder: Path) -> pa.Table | None:
    """The first parquet table of a local WebDataset folder (None without one); UserError for a
    folder without .tar shards."""
    if not folder.is_dir():
        raise UserError(f"{folder}: a WebDataset is an s3:// prefix or a local folder of .tar shards")
    files = shard_files(folder)
    if not any(path.suffix == ".tar" for path in files):
        raise UserError(f"{folder}: no .tar shards there")
    first = next((path for path in files if path.suffix == ".parquet"), None)
    if first is None:
        return None
    try:
        table = pq.read_table(first)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{first}: not a readable Parquet file ({first_line(exc)})") from exc
    return keyed_table(table, str(first))


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
        if (path / "styles.csv").is_file():
            return "kaggle"
        if next(path.glob("*.tar"), None):
            return "webdataset"
        if metadata_file(path):
            return "imagefolder"
        if not any(IMAGE_NAME.match(p.name) for p in path.iterdir()) and holds_images(path):
            return "classes"  # class folders, or images by any name
        return "folder"
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
        create_catalog(conn, FASHION, STYLE_TYPES, "id", None)  # made by the schema; again after a drop
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
    files = scan_images(Path(request.source), summary)
    if not files:
        raise UserError(nothing_to_ingest(Path(request.source)))
    summary.dataset = name
    columns = {"id": "bigint", "file": "text"}
    with conn.transaction():
        create_catalog(conn, name, columns, "id", None)
        dataset = register_dataset(conn, name, "id", None, None, "folder")
        table = pa.table(
            {"id": pa.array([i for i, _ in files], pa.int64()), "file": [p.name for _, p in files]}
        )
        summary.rows = load_rows(conn, dataset, list(columns), table.to_batches())
        add_catalog_rows(conn, dataset, list(columns))
    store.ensure_bucket(raw_bucket)
    forget_lost_shards(conn, store, dataset)
    pack_images(conn, store, dataset, iter(files), raw_bucket, concurrency, summary, on_progress)


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


def scan_images(images_dir: Path, summary: IngestSummary) -> list[tuple[int, Path]]:
    """(id, path) of the `{id}.jpg`-style files in id order, counting the others. Packed in id
    order, a dataset's storage order is its id order: a job's chunks (cut by id) then read
    neighbouring bytes of few shards. The names are held (about 100 bytes a file)."""
    found: list[tuple[int, Path]] = []
    others: list[str] = []
    with os.scandir(images_dir) as entries:
        for entry in entries:
            match = IMAGE_NAME.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), Path(entry.path)))
            else:
                summary.unrecognised_files += 1
                others += [entry.path][: REJECTED_SHOWN - len(others)]
    for path in others if found else []:  # a folder of nothing to ingest is refused in one line
        log.warning("ignoring %s: not named {id}.jpg", path)
    return sorted(found)


def nothing_to_ingest(folder: Path) -> str:
    """What a folder without a single `{id}.jpg` holds, and what to run instead."""
    files = [path for path in folder.iterdir() if path.is_file()]
    tars = [path for path in files if path.suffix == ".tar"]
    if tars:
        return (
            f"{folder} holds {len(tars)} WebDataset shards and no {{id}}.jpg files:"
            " run with --format webdataset"
        )
    manifests = [path for path in files if format_of(path.name)]
    if manifests:
        return (
            f"{folder} holds {len(manifests)} manifest files ({manifests[0].name}, ...) and no {{id}}.jpg"
            f" files: ingest a manifest with --id-column and --image-column"
        )
    return (
        f"{folder} holds {len(files)} files and no {{id}}.jpg, .tar or manifest files, and no class"
        " folders of images: nothing to ingest"
    )
