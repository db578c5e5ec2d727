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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import psycopg
import pyarrow as pa
from psycopg import sql

from common.catalog import COLUMNS, CatalogStats, RejectedLine, read_styles
from common.datasets import FASHION, FORMATS, check_name, register_dataset
from common.errors import UserError
from common.ingest.manifest import format_of
from common.ingest.register import add_catalog_rows, load_rows
from common.ingest.summary import IngestSummary
from common.ingest.tables import check_column_types, create_catalog
from common.ingest.units import IngestPlan, add_unit_counts
from common.storage import ObjectStore
from quarry.ingest_plan import ManifestRequest, check_webdataset_request, plan_manifest, plan_shards
from quarry.packing import forget_lost_shards, pack_images

log = logging.getLogger(__name__)

IMAGE_NAME = re.compile(r"^(\d+)\.(jpe?g|png|webp)$", re.IGNORECASE)
REJECTED_SHOWN = 20  # malformed CSV lines printed one by one before only counting
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
    packed here; a manifest or a WebDataset prefix is recorded as an ingest job for the pools,
    and `wait(job_id)` follows it to its end before the counts are read."""
    source_format = request.source_format or infer_format(store, request.source)
    if source_format not in FORMATS:
        raise UserError(f"--format {source_format!r}: one of {', '.join(FORMATS)}")
    summary = IngestSummary()
    if source_format == "kaggle":
        ingest_fashion(conn, store, Path(request.source), raw_bucket, concurrency, summary, on_progress)
    elif source_format == "folder":
        ingest_folder(conn, store, request, raw_bucket, concurrency, summary, on_progress)
    else:
        plan = plan_through_pools(conn, store, request, source_format, raw_bucket, summary)
        if plan is not None:
            summary.job_id = plan.job_id
            wait(plan.job_id)
            add_unit_counts(conn, plan.job_id, summary)
    summary.dataset = summary.dataset or dataset_name(request)
    summary.missing = count_missing(conn, summary.dataset)
    return summary.finish()


def plan_through_pools(
    conn: psycopg.Connection,
    store: ObjectStore,
    request: IngestRequest,
    source_format: str,
    raw_bucket: str,
    summary: IngestSummary,
) -> IngestPlan | None:
    """Record the ingest job of a manifest or a WebDataset prefix; None when nothing is new."""
    name = dataset_name(request)
    summary.dataset = name
    overrides = check_column_types(request.column_types)
    job_id = str(uuid.uuid4())
    if source_format == "webdataset":
        check_webdataset_request(request.id_column)
        return plan_shards(conn, store, request.source, name, overrides, job_id, summary)
    if not request.id_column:
        raise UserError("name the manifest's id column with --id-column")
    if not request.image_column:
        raise UserError("name the column of each image's s3:// URI with --image-column")
    wanted = ManifestRequest(name, request.id_column, request.image_column, overrides)
    return plan_manifest(conn, store, request.source, wanted, raw_bucket, job_id, summary)


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
        files = scan_images(Path(request.source), summary)
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
    found = []
    with os.scandir(images_dir) as entries:
        for entry in entries:
            match = IMAGE_NAME.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), Path(entry.path)))
            else:
                summary.unrecognised_files += 1
                log.warning("ignoring %s: not named {id}.jpg", entry.path)
    return sorted(found)
