"""The selection at scale: how soon a job's first chunk is dispatched and how fast the whole
selection is recorded, against the path before slicing (one statement sorting the whole
selection, one transaction) on the same server in the same run.

A dataset of --rows rows with five metadata columns and no images is made in SQL (an UNLOGGED
table: a bench shortcut, the catalog's own tables are logged), registered, and selected whole,
10% and 1% by `producer run` as a user runs it, with a real dispatcher sending chunks into a
private redis-server (no pool takes them: the dispatcher stops at its budget). Figures per run:
seconds from the command's start to the first chunk dispatched (the ledger polled every 10 ms),
seconds to record the whole selection (the command's exit), ids/s, CPU seconds of PostgreSQL
(every postgres process) and of the producer, the producer's peak RSS, and ledger bytes per id.
The baseline records --baseline-ids ids the old way, in this process, timed to its commit (when
its first chunk became visible); the new path then records the same ids.

Run: python -m bench.selection [--rows 100000000] [--baseline-ids 10000000]
Uses PostgreSQL at 127.0.0.1:5432 (a scratch database, dropped after). Default settings.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from bench.control_plane import cpu_seconds, postgres_processes
from bench.scratch import scratch_database
from common.config import Settings
from common.datasets import register_dataset
from common.db import connect, ensure_schema
from common.jobs import record_job
from common.roles import ensure_roles, grant_dataset
from quarry.query import CHUNK_ROWS, EVERY_ID, check_query, embed, user_session
from quarry.submit import new_job_id
from tests.stack import BIN, Stack

DATASET = "synthetic"
# five metadata columns; `bucket` spreads 0..99 evenly over the ids (7919 is prime)
MAKE_ROWS = f"""
INSERT INTO {DATASET}
SELECT g, (ARRAY['shirt', 'shoe', 'bag', 'watch', 'dress'])[1 + g %% 5],
       (ARRAY['red', 'blue', 'black', 'white'])[1 + (g / 7) %% 4], 2000 + (g %% 20)::integer,
       (g %% 1000) / 10.0, ((g * 7919) %% 100)::smallint
FROM generate_series(%s::bigint, %s::bigint) AS g
"""
SELECTIONS = [("100%", "TRUE"), ("10%", "bucket < 10"), ("1%", "bucket = 0")]
BATCH_ROWS = 10_000_000


@dataclass
class Run:
    label: str
    ids: int
    first_s: float  # command start -> first chunk dispatched (baseline: -> commit)
    total_s: float
    postgres_cpu_s: float
    producer_cpu_s: float
    peak_mib: float
    ledger_bytes_per_id: float
    slicing: str

    def line(self) -> str:
        return (
            f"{self.label:28} {self.ids:>12,} ids  first chunk {self.first_s:6.2f} s  recorded in"
            f" {self.total_s:7.2f} s  {self.ids / self.total_s:>11,.0f} ids/s  PostgreSQL CPU"
            f" {self.postgres_cpu_s:7.1f} s  producer CPU {self.producer_cpu_s:6.1f} s  peak"
            f" {self.peak_mib:5.0f} MiB  ledger {self.ledger_bytes_per_id:5.2f} B/id  ({self.slicing})"
        )


def make_dataset(url: str, settings: Settings, rows: int) -> float:
    started = time.perf_counter()
    with connect(url, autocommit=True) as conn:
        ensure_schema(conn)
        ensure_roles(conn, settings)
        conn.execute(
            f"""CREATE UNLOGGED TABLE {DATASET} (id bigint NOT NULL, category text, colour text,
                year integer, price real, bucket smallint)"""
        )
        for low in range(1, rows + 1, BATCH_ROWS):
            conn.execute(MAKE_ROWS, (low, min(rows, low + BATCH_ROWS - 1)))
        conn.execute(f"ALTER TABLE {DATASET} ADD PRIMARY KEY (id)")
        conn.execute(f"VACUUM ANALYZE {DATASET}")
        register_dataset(conn, DATASET, "id", None, None, "parquet")
        grant_dataset(conn, settings, DATASET)
    return time.perf_counter() - started


def ledger_bytes(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT pg_total_relation_size('job_chunks')").fetchone()[0])  # type: ignore[index]


def first_dispatch(url: str, stop: threading.Event, seen: list[float]) -> None:
    """Poll the ledger until any chunk is dispatched; its time (monotonic) into `seen`."""
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            found = conn.execute("SELECT EXISTS (SELECT FROM job_chunks WHERE state = 'dispatched')")
            if found.fetchone()[0]:  # type: ignore[index]
                seen.append(time.monotonic())
                return
            time.sleep(0.01)


def clear_jobs(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs, job_chunks, job_items, ingest_units, recorded_batches")


def producer_run(stack: Stack, label: str, where: str) -> Run:
    """`producer run` over the dataset, as a user types it."""
    url = stack.env["DATABASE_URL"]
    before_bytes, before_cpu = ledger_bytes(url), cpu_seconds(postgres_processes())
    stop, seen = threading.Event(), []
    poller = threading.Thread(target=first_dispatch, args=(url, stop, seen))
    poller.start()
    started = time.monotonic()
    query = f"SELECT id FROM {DATASET} WHERE {where}"
    command = [str(BIN / "producer"), "run", "--dataset", DATASET, "--query", query]
    env = {**os.environ, **stack.env}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    total_s = time.monotonic() - started
    out, err = process.communicate()
    if status != 0:
        raise SystemExit(f"producer run failed: {err.decode().strip()}")
    postgres_cpu = cpu_seconds(postgres_processes()) - before_cpu
    poller.join(30)
    stop.set()
    job_id = out.decode().strip().splitlines()[-1]
    with psycopg.connect(url) as conn:
        ids, slicing = conn.execute("SELECT total, slicing FROM jobs WHERE id = %s", (job_id,)).fetchone()  # type: ignore[misc]
    grown = ledger_bytes(url) - before_bytes
    clear_jobs(url)
    return Run(
        label,
        int(ids),
        (seen[0] - started) if seen else float("nan"),
        total_s,
        postgres_cpu,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 1024,
        grown / max(int(ids), 1),
        slicing,
    )


def one_transaction(url: str, settings: Settings, ids: int, chunk_size: int) -> Run:
    """The path before slicing: the whole selection sorted, numbered and cut by one statement,
    its chunks COPYed in one transaction, visible when it commits (the old quarry/query.py and
    quarry/submit.py, with the same statement and the same COPY)."""
    before_bytes, before_cpu = ledger_bytes(url), cpu_seconds(postgres_processes())
    process = psutil.Process()
    cpu_before = sum(process.cpu_times()[:2])
    query = f"SELECT id FROM {DATASET} WHERE id <= {ids}"
    started = time.monotonic()
    body = check_query(query)
    statement = embed(CHUNK_ROWS.replace("{where}", EVERY_ID), body)
    with (
        connect(url, autocommit=True) as owner,
        user_session(settings) as reader,
        reader.cursor(name="baseline") as cursor,
    ):
        cursor.itersize = 100
        cursor.execute(statement, {"first": 0, "size": chunk_size})
        record_job(owner, new_job_id(), query, {}, cursor)
    total_s = time.monotonic() - started
    run = Run(
        "one transaction (before)",
        ids,
        total_s,
        total_s,
        cpu_seconds(postgres_processes()) - before_cpu,
        sum(process.cpu_times()[:2]) - cpu_before,
        float("nan"),
        (ledger_bytes(url) - before_bytes) / ids,
        "one statement, one transaction",
    )
    clear_jobs(url)
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--baseline-ids", type=int, default=10_000_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="quarry-selection-"))
    with scratch_database("quarry_selection") as url:
        settings = Settings(database_url=url)
        stack = Stack({"DATABASE_URL": url, "DISPATCH_METRICS_PORT": "0"}, root / "stack")
        try:
            made_s = make_dataset(url, settings, args.rows)
            stack.start_redis()
            stack.start_dispatcher()
            print(
                f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
                f" PostgreSQL {psycopg.connect(url).info.server_version} on the same cores; dataset of"
                f" {args.rows:,} rows made in {made_s:.0f} s; default settings (SELECTION_SLICE_IDS"
                f" {settings.selection_slice_ids:,}, SELECTION_CONNECTIONS {settings.selection_connections},"
                f" CHUNK_SIZE {settings.chunk_size})",
                flush=True,
            )
            print(one_transaction(url, settings, args.baseline_ids, settings.chunk_size).line(), flush=True)
            print(producer_run(stack, "sliced (now)", f"id <= {args.baseline_ids}").line(), flush=True)
            for label, where in SELECTIONS:
                print(producer_run(stack, f"sliced (now), {label}", where).line(), flush=True)
        finally:
            stack.stop_all()
            print(f"logs: {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
