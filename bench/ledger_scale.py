"""The ledger at scale: recording time and producer memory as the selection grows, PostgreSQL
bytes per chunk (rows + indexes, while pending) and per item row, the time `status` takes,
projected to 1,000,000,000 images.

Run: python -m bench.ledger_scale [--sizes 100000 1000000] [--chunk-sizes 100 1000]. Uses
DATABASE_URL's server (created when missing; a scratch table `bench_ids`, dropped after); no
broker or workers are needed: `producer run` only records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
import uuid

from common.config import get_settings
from common.db import connect, ensure_database, ensure_schema
from common.jobs import job_progress
from common.ledger import ItemResult, upsert_items
from common.roles import ensure_roles

BILLION = 1_000_000_000
ITEM_ROWS_SAMPLE = 100_000


def measure(size: int, chunk_size: int) -> None:
    """Child process: record a job over `size` ids; print a JSON line of its figures."""
    from common.jobspec import JobSpec
    from quarry.submit import new_job_id, submit_job

    settings = get_settings()
    started = time.perf_counter()
    with connect(settings.database_url, autocommit=True) as conn:
        spec = JobSpec(job_id=new_job_id())
        query = f"SELECT id FROM bench_ids WHERE n <= {size}"
        chunks, _items = submit_job(conn, settings, query, spec, chunk_size)
        seconds = time.perf_counter() - started
        grown = stored_bytes(conn, "job_chunks", spec.job_id)
        status_s = min(timed(lambda: job_progress(conn, spec.job_id)) for _ in range(20))
        conn.execute("DELETE FROM jobs WHERE id = %s", (spec.job_id,))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "ids": size,
                "chunk_size": chunk_size,
                "chunks": chunks,
                "seconds": seconds,
                "peak_mib": peak_mib,
                "bytes_per_chunk": grown / chunks,
                "status_ms": status_s * 1000,
            }
        )
    )


def stored_bytes(conn, table: str, job_id: str) -> int:  # type: ignore[no-untyped-def]
    """Bytes a job's rows take in `table` (heap, TOAST and every index), measured on a fresh copy
    so that space freed by earlier runs cannot blur the figure."""
    conn.execute(f"CREATE TEMP TABLE measured (LIKE {table} INCLUDING INDEXES)")
    conn.execute(f"INSERT INTO measured SELECT * FROM {table} WHERE job_id = %s", (job_id,))
    size = int(conn.execute("SELECT pg_total_relation_size('measured')").fetchone()[0])
    conn.execute("DROP TABLE measured")
    return size


def timed(call) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def item_row_bytes(database_url: str) -> dict[str, float]:
    """Bytes per job_items row (table + index): a prediction row and a failure row."""
    rng = random.Random(7)
    figures = {}
    with connect(database_url, autocommit=True) as conn:
        for kind in ("prediction", "failure"):
            job_id = str(uuid.uuid4())
            conn.execute("INSERT INTO jobs (id, query, spec) VALUES (%s, '', '{}')", (job_id,))
            for start in range(0, ITEM_ROWS_SAMPLE, 10_000):
                rows = [
                    ItemResult(
                        i,
                        0,
                        0,
                        "done",
                        f"s3://quarry-output/{job_id}/{i}-0.jpg",
                        label="Tshirts",
                        score=rng.random(),
                        top_k=[{"label": "Tshirts", "score": 0.9}] * 5,
                    )
                    if kind == "prediction"
                    else ItemResult(i, 0, 0, "failed", error="transform: no image")
                    for i in range(start, start + 10_000)
                ]
                upsert_items(conn, job_id, rows)
            figures[kind] = stored_bytes(conn, "job_items", job_id) / ITEM_ROWS_SAMPLE
            conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(*args.child)
        return
    settings = get_settings()
    ensure_database(settings.database_url)
    with connect(settings.database_url, autocommit=True) as conn:
        ensure_schema(conn)
        conn.execute("DROP TABLE IF EXISTS bench_ids")
        # sparse, shuffled ids (7 n + 0..5), as a real selection's are: they compress less
        conn.execute(
            "CREATE TABLE bench_ids AS SELECT n, n * 7 + (random() * 5)::bigint AS id"
            f" FROM generate_series(1, {max(args.sizes)}) AS n ORDER BY random()"
        )
        ensure_roles(conn, settings)  # user SQL runs as the query role: let it read the ids
        conn.execute(f"GRANT SELECT ON bench_ids TO {settings.query_role}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"{'ids':>10} {'chunk':>6} {'chunks':>7} {'record s':>9} {'peak RSS':>9}"
        f" {'B/chunk':>8} {'status ms':>9}"
    )
    per_chunk = {}
    try:
        for chunk_size in args.chunk_sizes:
            for size in args.sizes:
                out = subprocess.run(
                    [sys.executable, "-m", "bench.ledger_scale", "--child", str(size), str(chunk_size)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                r = json.loads(out)
                per_chunk[chunk_size] = r["bytes_per_chunk"]
                print(
                    f"{r['ids']:>10,} {chunk_size:>6} {r['chunks']:>7,} {r['seconds']:>9.2f}"
                    f" {r['peak_mib']:>6.1f} MiB {r['bytes_per_chunk']:>8.0f} {r['status_ms']:>9.2f}"
                )
        rows = item_row_bytes(settings.database_url)
    finally:
        with connect(settings.database_url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_ids")
    print(
        f"job_items: {rows['prediction']:.0f} B per prediction row, {rows['failure']:.0f} B per failure row"
    )
    print("projection for 1,000,000,000 images, 1 variant:")
    for chunk_size, size in sorted(per_chunk.items()):
        chunks_gb = BILLION / chunk_size * size / 1e9
        for label, item_gb in (
            ("--item-rows all", BILLION * rows["prediction"] / 1e9),
            ("--item-rows failures, 0.1% failed", BILLION * 0.001 * rows["failure"] / 1e9),
        ):
            print(
                f"  chunk size {chunk_size:>5}, {label:<36} job_chunks {chunks_gb:7.1f} GB"
                f" + job_items {item_gb:7.1f} GB = {chunks_gb + item_gb:7.1f} GB"
            )


if __name__ == "__main__":
    main()
