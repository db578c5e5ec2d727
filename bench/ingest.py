"""Ingest, side by side on one real S3 server on loopback (tests/stack.py start_s3), in one run:

1. a local folder of images: one PUT per image from 16 threads (what `producer ingest` did before
   datasets: read, decode to check, upload) against Quarry's packing into tar shards, defaults;
2. a synthetic by-reference Parquet manifest (N rows in row groups of 250,000, `s3://` locations,
   five metadata columns; default 1,000,000) registered from an `s3://` object through the pools
   (a private redis-server, the three pools and a dispatcher, as `make up` starts them): seconds
   from `producer ingest` to its end, rows/s, and PostgreSQL bytes per image for the catalog table
   plus its `locations` rows, projected to 1,000,000,000 images.

    python -m bench.ingest [--dataset DIR] [--rows N]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import Settings
from common.db import connect, ensure_database
from common.errors import PermanentError
from common.images import decode
from common.paths import default_dataset_path
from common.storage import ObjectStore
from quarry import Quarry
from tests.stack import Stack, start_s3

THREADS = 16  # the old ingest's default INGEST_CONCURRENCY


def upload_one_per_image(store: ObjectStore, bucket: str, folder: Path) -> int:
    """The baseline: each image read, decoded (to refuse a bad one) and PUT as its own object."""

    def upload(path: Path) -> int:
        data = path.read_bytes()
        try:
            decode(data)
        except PermanentError:
            return 0
        store.put(bucket, f"images/{path.name}", data, content_type="image/jpeg", metadata={})
        return 1

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return sum(pool.map(upload, sorted((folder / "images").iterdir())))


def synthetic_manifest(path: Path, rows: int) -> None:
    """N rows: an integer id, an s3:// location, and five metadata columns, written in row groups."""
    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, 250_000):
        ids = np.arange(start, min(rows, start + 250_000), dtype=np.int64)
        table = pa.table(
            {
                "image_id": ids,
                "location": [f"s3://their-images/part-{i % 1000:03d}/{i:010d}.jpg" for i in ids],
                "caption": [f"a photo of item {i}" for i in ids],
                "width": rng.integers(64, 2048, len(ids), dtype=np.int32),
                "height": rng.integers(64, 2048, len(ids), dtype=np.int32),
                "aesthetic": rng.random(len(ids), dtype=np.float32),
                "nsfw": rng.random(len(ids)) < 0.01,
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=default_dataset_path())
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="quarry-ingest-"))
    name = f"quarry_ingest_{uuid.uuid4().hex[:8]}"
    s3 = start_s3(root)
    env = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{name}",
        **s3.env(),
        "RAW_BUCKET": "bench-raw",
        "OUTPUT_BUCKET": "bench-out",
    }
    stack = Stack(env, root / "stack")
    try:
        ensure_database(env["DATABASE_URL"])
        stack.start_redis()
        os.environ.update(stack.env)
        settings = Settings()
        store = ObjectStore(settings, max_connections=THREADS)
        quarry = Quarry(settings)
        quarry.init()
        images = len(list((args.dataset / "images").iterdir()))
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()};"
            f" S3: {s3.describe()}; dataset {args.dataset} ({images} files)"
        )

        store.ensure_bucket("bench-objects")
        started = time.monotonic()
        uploaded = upload_one_per_image(store, "bench-objects", args.dataset)
        baseline = uploaded / (time.monotonic() - started)
        print(f"one PUT per image, {THREADS} threads: {uploaded} images {baseline:7.1f} img/s (baseline)")
        summary = quarry.ingest(args.dataset)
        packed = summary.packed / summary.seconds
        print(
            f"quarry ingest (packed):        {summary.packed} images {packed:7.1f} img/s"
            f" {packed / baseline:5.2f}x baseline; {summary.shards} shards, {summary.seconds:.1f} s"
        )

        manifest = root / "manifest.parquet"
        synthetic_manifest(manifest, args.rows)
        store.ensure_bucket("bench-manifests")
        store.upload_file(
            str(manifest), "bench-manifests", "manifest.parquet", content_type="application/x-parquet"
        )
        stack.start_pools()
        stack.start_dispatcher()
        started = time.monotonic()
        summary = quarry.ingest(
            "s3://bench-manifests/manifest.parquet",
            dataset="synthetic",
            id_column="image_id",
            image_column="location",
            progress=False,
        )
        seconds = time.monotonic() - started
        assert summary.units_failed == 0 and summary.images == args.rows, summary
        with connect(env["DATABASE_URL"]) as db:
            catalog = db.execute("SELECT pg_total_relation_size('synthetic')").fetchone()[0]  # type: ignore[index]
            locations = db.execute("SELECT pg_total_relation_size('locations')").fetchone()[0]  # type: ignore[index]
            located = db.execute("SELECT count(*) FROM locations").fetchone()[0]  # type: ignore[index]
        per_image = (catalog + locations * summary.rows / located) / summary.rows
        print(
            f"by-reference manifest: {summary.rows} rows in {seconds:.1f} s"
            f" ({summary.rows / seconds:,.0f} rows/s);"
            f" PostgreSQL {catalog / summary.rows:.0f} B/image catalog + {locations / located:.0f} B/image"
            f" locations (with indexes) = {per_image:.0f} B/image; 1,000,000,000 images ≈"
            f" {per_image * 1e9 / 2**40:.2f} TiB"
        )
    finally:
        stack.stop_all()
        s3.stop()
        with connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
