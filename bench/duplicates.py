"""`producer duplicates` at scale: quarry/duplicates.py over a set of synthetic embeddings with
planted near-duplicates, on one PostgreSQL with pgvector (this machine's when it has it, else the
embedded one).

The set is bench.similarity's (--count 256-dimension vectors in --clusters clusters; --queries
anchors with 10 near copies each, so --queries groups of 11 are planted), loaded with COPY and
indexed (HNSW) first, untimed. Then the grouping, timed: every image's nearest neighbours from
the index, pairs under the default threshold joined into groups and recorded in `duplicates`.
Reported for each --connections (DUPLICATES_CONNECTIONS; 1 is the search one page at a time, the
default what a user gets): seconds, images/s, the groups found against the planted ones, and the
bench process's peak memory during the grouping (which holds ids, never embeddings); and the
index's size against the server's shared_buffers.

Run: python -m bench.duplicates [--count 100000] [--queries 200] [--connections 1,4]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import psycopg

from bench.scratch import scratch_database
from bench.similarity import DIMENSIONS, fill, unindexed_set
from common.config import Settings
from common.db import connect
from quarry.duplicates import DEFAULT_THRESHOLD, SWEEP, WIDEN, find_duplicates
from tests.vector_server import vector_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--connections",
        default=f"1,{Settings.model_fields['duplicates_connections'].default}",
        help="DUPLICATES_CONNECTIONS of each run, comma-separated [1 and the default]",
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.count:,} embeddings of {DIMENSIONS}"
        f" dimensions, {args.clusters} clusters, {args.queries} planted groups of 11;"
        f" threshold {DEFAULT_THRESHOLD}; {SWEEP} over every image, {WIDEN} over those it paired"
    )
    with vector_server() as server, scratch_database("bench_duplicates", server) as url:
        settings = Settings(database_url=url)
        with connect(url, autocommit=True) as conn:
            found = unindexed_set(conn, settings)
            fill(conn, found.table, args.count, args.clusters, args.queries)
            conn.execute("SET maintenance_work_mem = '4GB'; SET max_parallel_maintenance_workers = 1")
            conn.execute(
                f"CREATE INDEX {found.table}_embedding_idx ON {found.table}"
                " USING hnsw (embedding vector_cosine_ops)"
            )
            conn.execute(f"VACUUM ANALYZE {found.table}")
            (index, buffers) = conn.execute(
                "SELECT pg_indexes_size(%s::regclass), current_setting('shared_buffers')", (found.table,)
            ).fetchone()  # type: ignore[misc]
            print(f"index {index / 2**20:,.0f} MiB; the server's shared_buffers {buffers}")
            for connections in map(int, args.connections.split(",")):
                group_once(conn, settings.model_copy(update={"duplicates_connections": connections}), args)


def memory_mib(field: str) -> float:
    """This process's VmRSS (resident now) or VmHWM (its peak since the last reset), in MiB."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith(f"{field}:"))) / 1024


def group_once(conn: psycopg.Connection, settings: Settings, args: argparse.Namespace) -> None:
    before = memory_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    started = time.perf_counter()
    groups = find_duplicates(conn, settings, "items", "bench")
    seconds = time.perf_counter() - started
    peak = memory_mib("VmHWM")
    planted_first = args.count - args.queries * 10
    planted = {
        anchor: [anchor, *range(planted_first + (anchor - 1) * 10 + 1, planted_first + anchor * 10 + 1)]
        for anchor in range(1, args.queries + 1)
    }
    exact = sum(groups.groups.get(anchor) == ids for anchor, ids in planted.items())
    others = [g for g in groups.groups if g not in planted]
    print(
        f"{settings.duplicates_connections} connection(s): grouped {groups.images:,} images"
        f" in {seconds:.1f} s"
        f" ({groups.images / seconds:,.0f} images/s); {len(groups.groups)} groups: {exact} of"
        f" {args.queries} planted groups exactly, {len(others)} others; peak memory during the grouping"
        f" {peak:.0f} MiB ({before:.0f} MiB before it)",
        flush=True,
    )


if __name__ == "__main__":
    main()
