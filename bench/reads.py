"""Reads of a selection from a packed shard, side by side: merged ranged GETs (the defaults) against
one GET per image, for a full scan and uniform random 10% and 1% selections. Counts the GETs and
the bytes they returned (from the responses), per selected image, and the endpoint's own
latency and bandwidth, from which the break-even hole of READ_HOLE_BYTES follows.

Run: python -m bench.reads [--dataset ../shared/fashion-sample]
Uses PostgreSQL at 127.0.0.1:5432 (a scratch database, dropped after) and a real S3 server on
loopback (tests/stack.py start_s3).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.scratch import scratch_database
from common.batching import batched
from common.config import Settings
from common.datasets import FASHION, lookup_locations
from common.paths import default_dataset_path
from common.sources import Source
from common.storage import ObjectStore
from tests.stack import BIN, S3Server, start_s3

FRACTIONS = (1.0, 0.1, 0.01)
SEED = 0


@dataclass
class Tally:
    """What the GETs of one pass returned."""

    gets: int = 0
    bytes: int = 0

    def count(self, http_response: Any, **_: Any) -> None:
        self.gets += 1
        self.bytes += int(http_response.headers.get("Content-Length", 0))


def counted_store(settings: Settings) -> tuple[ObjectStore, Tally]:
    store = ObjectStore(settings)
    tally = Tally()
    store._client.meta.events.register("after-call.s3.GetObject", tally.count)
    return store, tally


def read_selection(store: ObjectStore, db: psycopg.Connection, ids: Sequence[int], chunk_size: int) -> float:
    """Seconds to read every selected image as the transform stage does: chunks cut in id order,
    each chunk's sources read together."""
    started = time.perf_counter()
    for chunk in batched(ids, chunk_size):
        sources = [loc.source for loc in lookup_locations(db, FASHION, list(chunk)).values() if loc.source]
        got = store.read_many(sources)
        assert all(isinstance(value, tuple) for value in got.values()), "a read failed"
    return time.perf_counter() - started


def endpoint_figures(store: ObjectStore, source: Source, size: int) -> tuple[float, float]:
    """(seconds to the first byte of a 1-byte ranged GET, median of 30; bytes/s of whole GETs)."""
    bucket, key = source.uri[5:].split("/", 1)
    client = store._client
    latencies = []
    for _ in range(30):
        started = time.perf_counter()
        client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].read()
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(3):
        client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return statistics.median(latencies), 3 * size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=default_dataset_path())
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="quarry-reads-"))
    s3 = start_s3(root)
    try:
        with scratch_database("quarry_reads") as database_url:
            measure(args.dataset, database_url, s3)
    finally:
        s3.stop()
        print(f"logs: {root}", file=sys.stderr)


def measure(dataset: Path, database_url: str, s3: S3Server) -> None:
    """Ingest `dataset` packed, then read the selections both ways and print the table."""
    env = {
        "DATABASE_URL": database_url,
        **s3.env(),
        "DATASET_PATH": str(dataset),
        "RAW_BUCKET": "bench-raw",
    }
    subprocess.run(
        [str(BIN / "producer"), "ingest"], env={**os.environ, **env}, check=True, capture_output=True
    )
    defaults = Settings(
        database_url=env["DATABASE_URL"],
        s3_endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        raw_bucket="bench-raw",
    )
    one_per_image = defaults.model_copy(update={"read_hole_bytes": 0, "read_whole_fraction": 1.0})
    with psycopg.connect(env["DATABASE_URL"]) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM locations ORDER BY id")]
        shards = db.execute("SELECT count(*), sum(size)::bigint, min(uri) FROM shards").fetchone()
        assert shards is not None
        image_bytes = db.execute("SELECT sum(byte_length)::bigint FROM locations").fetchone()[0]  # type: ignore[index]
        first = lookup_locations(db, FASHION, ids[:1])[ids[0]].source
        assert first is not None
        store, _ = counted_store(defaults)
        latency, bandwidth = endpoint_figures(store, first, shards[1])
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()};"
            f" dataset {dataset}: {len(ids)} images packed in {shards[0]} shard(s) of"
            f" {shards[1] / 1e6:.1f} MB, mean image {image_bytes / len(ids) / 1e3:.1f} KB;"
            f" chunk size {defaults.chunk_size}; S3: {s3.describe()}"
        )
        hole_kib = defaults.read_hole_bytes >> 10
        print(
            f"endpoint: first byte {latency * 1e3:.2f} ms (median of 30), whole-object GET"
            f" {bandwidth / 1e6:.0f} MB/s; break-even hole = latency x bandwidth ="
            f" {latency * bandwidth / 1024:.0f} KiB (READ_HOLE_BYTES {hole_kib} KiB)"
        )
        rng = random.Random(SEED)
        for fraction in FRACTIONS:
            selected = sorted(rng.sample(ids, max(1, round(fraction * len(ids)))))
            rows = []
            for label, settings in (
                ("one GET per image", one_per_image),
                ("merged (defaults)", defaults),
            ):
                store, tally = counted_store(settings)
                seconds = read_selection(store, db, selected, settings.chunk_size)
                rows.append((label, seconds, tally))
            base_seconds = rows[0][1]
            for label, seconds, tally in rows:
                per_image = (tally.gets / len(selected), tally.bytes / len(selected) / 1e3)
                print(
                    f"{fraction:5.0%} ({len(selected):4d} images)  {label:17s}"
                    f" GET/image {per_image[0]:6.3f}  KB/image {per_image[1]:8.1f}  {seconds:6.2f} s"
                    f" {len(selected) / seconds:8.1f} img/s  {base_seconds / seconds:5.2f}x"
                )


if __name__ == "__main__":
    main()
