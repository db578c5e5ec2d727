"""Peak memory of `producer run` as the selection grows: it must stay flat (ids are streamed).

Run: python -m bench.producer_memory [--sizes 100000 1000000]. Uses DATABASE_URL's server (a
scratch table `bench_ids`, dropped after) and Redis db 14 as a scratch broker (flushed after);
no workers run, so the tasks only pile up in Redis.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time

import redis

from common.config import get_settings
from common.db import connect, ensure_schema

SCRATCH_BROKER = "redis://127.0.0.1:6379/14"


def measure(size: int) -> None:
    """Child process: submit a job over `size` ids, print seconds and peak RSS."""
    from celery import Celery

    from common.jobspec import JobSpec
    from producer.submit import new_job_id, submit_job
    from workers.routes import TASK_ROUTES

    app = Celery(broker=SCRATCH_BROKER)
    app.conf.task_routes = TASK_ROUTES
    settings = get_settings()
    started = time.perf_counter()
    with connect(settings.database_url, autocommit=True) as conn:
        spec = JobSpec(job_id=new_job_id())
        chunks = submit_job(
            conn, app, settings.database_url, f"SELECT id FROM bench_ids WHERE id <= {size}", spec, 1000, 600
        )
        conn.execute("DELETE FROM jobs WHERE id = %s", (spec.job_id,))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - started
    print(f"{size:>10} ids  {chunks:>6} chunks  {seconds:7.1f} s  peak RSS {peak_mib:6.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child)
        return
    settings = get_settings()
    with connect(settings.database_url, autocommit=True) as conn:
        ensure_schema(conn)
        conn.execute("DROP TABLE IF EXISTS bench_ids")
        conn.execute(f"CREATE TABLE bench_ids AS SELECT generate_series(1, {max(args.sizes)})::bigint AS id")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; chunk size 1000")
    try:
        for size in args.sizes:
            redis.Redis.from_url(SCRATCH_BROKER).flushdb()
            subprocess.run([sys.executable, "-m", "bench.producer_memory", "--child", str(size)], check=True)
    finally:
        redis.Redis.from_url(SCRATCH_BROKER).flushdb()
        with connect(settings.database_url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_ids")


if __name__ == "__main__":
    main()
