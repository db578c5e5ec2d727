"""The control plane's ceiling: the real dispatcher, ledger (PostgreSQL) and broker (a private
redis-server) with the stage work replaced by `bench.null_worker`, which records each chunk's
items through the stages' own code and does nothing else. A job of --ids ids in chunks of
--chunk-size runs once per worker count; each run reports chunks/s and items/s from the ledger's
own timestamps, and the CPU each part used (cores busy, from psutil) and the broker's memory.

The 1-hour line for 1,000,000,000 items is 1e9 / 3600 / 1,000 = 278 chunks/s at 1,000 a chunk.

Run: python -m bench.control_plane [--ids 2000000] [--chunk-size 1000] [--workers 1 2 4 8]
     [--item-rows failures|all]
Uses PostgreSQL at 127.0.0.1:5432 (a scratch database, dropped after).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from bench.scratch import scratch_database
from common.config import Settings
from common.datasets import register_dataset
from common.db import connect, ensure_schema
from common.roles import ensure_roles, grant_dataset
from tests.stack import BIN, Stack, wait_until

HOUR_LINE_CHUNKS_S = 1e9 / 3600 / 1000


@dataclass
class Cpu:
    """CPU seconds used so far by each part of the control plane."""

    postgres: float
    redis: float
    dispatcher: float
    workers: float


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            continue
    return total


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]


def sample(stack: Stack) -> Cpu:
    return Cpu(
        cpu_seconds(postgres_processes()),
        cpu_seconds(tree(stack.processes["redis"].pid)),
        cpu_seconds(tree(stack.processes["dispatcher"].pid)),
        cpu_seconds(tree(stack.processes["worker-null"].pid)),
    )


def busy_cores(stack: Stack, chunk_size: int, item_rows: str) -> dict[str, float]:
    """Cores each part kept busy while a second, identical job ran (the first's recording of its
    chunks excluded: sampled from when the second job is recorded to its end)."""
    job_id = stack.submit(
        "SELECT id FROM synthetic_ids",
        *("--dataset", "synthetic_ids", "--chunk-size", str(chunk_size), "--item-rows", item_rows),
    )
    before, started = sample(stack), time.monotonic()
    wait_until(lambda: stack.progress(job_id).ended, 3600, "the job", 0.05)
    after, wall = sample(stack), time.monotonic() - started
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
    return {part: (getattr(after, part) - getattr(before, part)) / wall for part in vars(after)}


def start_null_workers(stack: Stack, processes: int) -> None:
    stack.start(
        "worker-null",
        [
            str(BIN / "celery"),
            "-A",
            "bench.null_worker",
            "worker",
            "-Q",
            "transform",
            "--pool",
            "prefork",
            "--concurrency",
            str(processes),
            "--loglevel",
            "WARNING",
            "-n",
            f"null-{processes}@%h",
        ],
    )


def run_job(stack: Stack, chunk_size: int, item_rows: str) -> tuple[str, int, int, float, float]:
    """(job id, chunks, items, seconds to record the job, seconds from then to its end), both by
    the ledger's clock: the first is `producer run` (selection, COPY of the chunks), the second
    the control plane at work."""
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        before = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        job_id = stack.submit(
            "SELECT id FROM synthetic_ids",
            *("--dataset", "synthetic_ids", "--chunk-size", str(chunk_size), "--item-rows", item_rows),
        )
        recorded = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    wait_until(lambda: stack.progress(job_id).ended, 3600, "the job", 0.5)
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT chunks, total, finished_at, state FROM jobs WHERE id = %s", (job_id,)
        ).fetchone()
    assert row is not None and row[3] == "finished", row
    submit_s = (recorded - before).total_seconds()
    return job_id, int(row[0]), int(row[1]), submit_s, (row[2] - recorded).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=int, default=2_000_000)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--item-rows", choices=["failures", "all"], default="failures")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="quarry-control-"))
    try:
        with scratch_database("quarry_control") as database_url:
            stack = Stack({"DATABASE_URL": database_url, "DISPATCH_METRICS_PORT": "0"}, root / "stack")
            try:
                measure(stack, args)
            finally:
                stack.stop_all()
    finally:
        print(f"logs: {root}", file=sys.stderr)


def measure(stack: Stack, args: argparse.Namespace) -> None:
    """A dataset of --ids ids and no images, then one job per worker count."""
    settings = Settings(database_url=stack.env["DATABASE_URL"])
    with connect(stack.env["DATABASE_URL"], autocommit=True) as conn:  # a dataset of ids, no images
        ensure_schema(conn)
        ensure_roles(conn, settings)
        ids = "CREATE TABLE synthetic_ids AS SELECT generate_series(1, %s)::bigint AS id"
        conn.execute(ids, (args.ids,))
        register_dataset(conn, "synthetic_ids", "id", None, None, "csv")
        grant_dataset(conn, settings, "synthetic_ids")
    stack.start_redis()
    stack.start_dispatcher()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()};"
        f" PostgreSQL and redis-server on the same cores; {args.ids:,} ids in chunks of"
        f" {args.chunk_size:,}, --item-rows {args.item_rows}; default dispatch settings"
        f" (DISPATCH_BUDGET_CHUNKS 64, DISPATCH_INTERVAL_S 0.5); the 1-hour line for 1e9 items:"
        f" {HOUR_LINE_CHUNKS_S:.0f} chunks/s"
    )
    for processes in args.workers:
        start_null_workers(stack, processes)
        time.sleep(3)  # the pool's processes up
        job_id, chunks, items, submit_s, seconds = run_job(stack, args.chunk_size, args.item_rows)
        busy = busy_cores(stack, args.chunk_size, args.item_rows)
        redis_peak = int(stack.redis().info("memory")["used_memory_peak"])
        print(
            f"{processes:2d} worker processes: {chunks:,} chunks recorded in {submit_s:5.2f} s, run in"
            f" {seconds:6.2f} s: {chunks / seconds:7.1f} chunks/s, {items / seconds:10,.0f} items/s"
            f" ({chunks / seconds / HOUR_LINE_CHUNKS_S:4.2f}x the 1-hour line); cores busy:"
            + ", ".join(f" {part} {value:4.2f}" for part, value in busy.items())
            + f"; redis peak {redis_peak / 2**20:5.1f} MiB"
        )
        with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
            conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
        stack.stop("worker-null")


if __name__ == "__main__":
    main()
