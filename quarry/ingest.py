"""`producer ingest`: load styles.csv into PostgreSQL and the images into the raw bucket."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from common.batching import batched
from common.catalog import COLUMNS, CatalogStats, RejectedLine, read_styles
from common.errors import ObjectMissing, PermanentError, UserError
from common.images import ENCODINGS, checksum, decode, sniff_format
from common.storage import ObjectStore

log = logging.getLogger(__name__)

IMAGE_NAME = re.compile(r"^(\d+)\.(jpe?g|png|webp)$", re.IGNORECASE)
FILES_PER_BATCH = 256  # images read, checked and recorded together; bounds memory
STORE_MARKER = "_quarry/store-id"  # identifies a raw bucket's contents across restarts
REJECTED_SHOWN = 20  # malformed CSV lines printed one by one before only counting


@dataclass
class IngestSummary:
    """What one ingest did; printed by the CLI."""

    rows: int = 0
    repaired: int = 0
    rejected: int = 0
    duplicate_ids: int = 0
    uploaded: int = 0
    present: int = 0
    missing: int = 0
    bad: int = 0
    unrecognised_files: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic, repr=False)

    @property
    def images_seen(self) -> int:
        return self.uploaded + self.present + self.bad


@dataclass(frozen=True)
class ImageFile:
    """The outcome of reading one image file."""

    image_id: int
    key: str
    size: int
    sha256: str
    width: int | None
    height: int | None
    error: str | None
    data: bytes = field(repr=False, default=b"")


def ingest(
    conn: psycopg.Connection,
    store: ObjectStore,
    dataset: Path,
    raw_bucket: str,
    concurrency: int,
    on_progress: Callable[[IngestSummary], None] = lambda summary: None,
) -> IngestSummary:
    """Load a Kaggle-layout dataset (`styles.csv` + `images/`); re-runnable and resumable.

    Images recorded as stored with the same checksum in this same bucket are skipped. The bucket
    is recognised by a marker object (STORE_MARKER); a new or wiped bucket gets a new marker, so
    every image is uploaded to it again.
    """
    csv_path, images_dir = dataset / "styles.csv", dataset / "images"
    if not csv_path.is_file():
        raise UserError(f"dataset {dataset}: no styles.csv")
    if not images_dir.is_dir():
        raise UserError(f"dataset {dataset}: no images/ folder")
    summary = IngestSummary()
    store.ensure_bucket(raw_bucket)
    store_id = store_marker(store, raw_bucket)
    load_styles(conn, csv_path, summary)
    upload_images(conn, store, images_dir, raw_bucket, concurrency, summary, store_id, on_progress)
    summary.missing = conn.execute(
        "SELECT count(*) FROM styles s WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.id = s.id)"
    ).fetchone()[0]  # type: ignore[index]
    summary.seconds = time.monotonic() - summary.started
    return summary


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


def read_image(image_id: int, path: Path) -> ImageFile:
    """Read, hash and decode one file; an unreadable image is recorded, not raised."""
    data = path.read_bytes()
    key = f"images/{image_id}{path.suffix.lower()}"
    try:
        height, width = decode(data).shape[:2]
    except PermanentError as exc:
        return ImageFile(image_id, key, len(data), checksum(data), None, None, str(exc))
    return ImageFile(image_id, key, len(data), checksum(data), width, height, None, data)


def upload_images(
    conn: psycopg.Connection,
    store: ObjectStore,
    images_dir: Path,
    bucket: str,
    concurrency: int,
    summary: IngestSummary,
    store_id: str,
    on_progress: Callable[[IngestSummary], None],
) -> None:
    """Upload new or changed images in parallel, a bounded batch at a time, recording each batch
    once stored, so an interrupted ingest resumes where it stopped."""
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ingest") as pool:
        for batch in batched(scan_images(images_dir, summary), FILES_PER_BATCH):
            known = stored_checksums(conn, [i for i, _ in batch], store_id)
            files = list(pool.map(lambda item: read_image(*item), batch))
            to_upload = []
            for image in files:
                if image.error is not None:
                    summary.bad += 1
                    log.warning("bad image %d: %s", image.image_id, image.error)
                elif known.get(image.image_id) == image.sha256:
                    summary.present += 1
                else:
                    to_upload.append(image)
            list(pool.map(lambda image: put_image(store, bucket, image), to_upload))
            summary.uploaded += len(to_upload)
            record_images(conn, files, store_id)
            on_progress(summary)


def put_image(store: ObjectStore, bucket: str, image: ImageFile) -> None:
    """Upload one raw image with its checksum as metadata."""
    content_type = ENCODINGS[sniff_format(image.data)][1]
    store.put(bucket, image.key, image.data, content_type=content_type, metadata={"sha256": image.sha256})


def store_marker(store: ObjectStore, bucket: str) -> str:
    """The id written in the bucket's marker object, written now if the bucket has none."""
    try:
        return store.get(bucket, STORE_MARKER).decode()
    except ObjectMissing:
        marker = str(uuid.uuid4())
        store.put(bucket, STORE_MARKER, marker.encode(), content_type="text/plain", metadata={})
        return marker


def stored_checksums(conn: psycopg.Connection, image_ids: list[int], store_id: str) -> dict[int, str]:
    """Checksums of the ids already recorded as stored in this bucket."""
    rows = conn.execute(
        "SELECT id, checksum FROM images WHERE id = ANY (%s) AND status = 'stored' AND store_id = %s",
        (image_ids, store_id),
    ).fetchall()
    return dict(rows)


def record_images(conn: psycopg.Connection, files: list[ImageFile], store_id: str) -> None:
    """Upsert one batch of image rows."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(
            """
            INSERT INTO images (id, raw_key, size_bytes, width, height, checksum, status, error, store_id)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (id) DO UPDATE SET raw_key = EXCLUDED.raw_key,
                size_bytes = EXCLUDED.size_bytes, width = EXCLUDED.width,
                height = EXCLUDED.height, checksum = EXCLUDED.checksum, status = EXCLUDED.status,
                error = EXCLUDED.error, store_id = EXCLUDED.store_id, updated_at = now()
            """,
            [
                (
                    f.image_id,
                    None if f.error else f.key,
                    f.size,
                    f.width,
                    f.height,
                    f.sha256,
                    "bad" if f.error else "stored",
                    f.error,
                    store_id,
                )
                for f in files
            ],
        )
