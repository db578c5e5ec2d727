"""What the job row costs: chunks finished per second when every finishing chunk updates its job's
counters (one hot row, all recorders of the job) against the same work spread over one job per
recorder (no shared row), side by side, with the lock order the ledger uses (job FOR KEY SHARE,
then the chunk FOR UPDATE, then the counters).

Run: python -m bench.ledger_contention [--chunks 4000] [--chunk-size 1000] [--threads 1 4 8].
Uses DATABASE_URL's server (a scratch database `quarry_bench_contention`, dropped after); each
recorder is a thread with its own connection, recording whole chunks with --item-rows failures
(no item rows: the figure is the ledger's, not the item table's).
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
import uuid

import psycopg.conninfo

from common.config import get_settings
from common.db import connect, ensure_database, ensure_schema
from common.ledger import ItemResult, Ticket, record_progress

LEASE_S = 300


def make_jobs(conn: psycopg.Connection, jobs: int, chunks: int, chunk_size: int) -> list[str]:
    """`jobs` running jobs sharing `chunks` dispatched chunks of `chunk_size` ids."""
    ids = []
    per_job = chunks // jobs
    for _ in range(jobs):
        job_id = str(uuid.uuid4())
        conn.execute(
            "INSERT INTO jobs (id, query, spec, total, chunks) VALUES (%s, '', '{}', %s, %s)",
            (job_id, per_job * chunk_size, per_job),
        )
        conn.execute(
            """INSERT INTO job_chunks (job_id, chunk_index, image_ids, items, state, dispatches,
                   attempts, started_by, lease_until)
               SELECT %s, c, array(SELECT generate_series(1, %s)::bigint), %s, 'dispatched', 1, 1, 1,
                      now() + interval '1 hour'
               FROM generate_series(0, %s - 1) c""",
            (job_id, chunk_size, chunk_size, per_job),
        )
        ids.append(job_id)
    return ids


def record_all(url: str, work: list[Ticket], chunk_size: int) -> None:
    results = [ItemResult(i + 1, 0, i, "done") for i in range(chunk_size)]
    with connect(url, autocommit=True) as conn:
        for ticket in work:
            assert record_progress(conn, ticket, results, "failures", LEASE_S)


def run(url: str, threads: int, chunks: int, chunk_size: int, shared: bool) -> float:
    """Chunks finished per second by `threads` recorders, on one job (`shared`) or one each."""
    with connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs, job_chunks, job_items, ingest_units, recorded_batches")
        jobs = make_jobs(conn, 1 if shared else threads, chunks, chunk_size)
        per_job = chunks // len(jobs)
        tickets = [Ticket(job, c, 1) for job in jobs for c in range(per_job)]
    # shared: recorders interleave over the one job's chunks; else each takes its own job
    shares = (
        [tickets[n::threads] for n in range(threads)]
        if shared
        else [[t for t in tickets if t.job_id == job] for job in jobs]
    )
    workers = [threading.Thread(target=record_all, args=(url, share, chunk_size)) for share in shares]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    with connect(url, autocommit=True) as conn:
        finished = conn.execute("SELECT count(*) FROM jobs WHERE state = 'finished'").fetchone()
        assert finished is not None and finished[0] == len(jobs), "a job did not finish"
    return len(tickets) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    url = psycopg.conninfo.make_conninfo(get_settings().database_url, dbname="quarry_bench_contention")
    ensure_database(url)
    with connect(url, autocommit=True) as conn:
        ensure_schema(conn)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, PostgreSQL on {url.split('@')[-1]}")
    print(f"{args.chunks} chunks of {args.chunk_size} items, recorded whole (item rows: failures)")
    print(f"{'recorders':>9}  {'one job (hot row)':>18}  {'a job each':>12}  {'ratio':>6}")
    try:
        for threads in args.threads:
            hot = run(url, threads, args.chunks, args.chunk_size, shared=True)
            spread = run(url, threads, args.chunks, args.chunk_size, shared=False)
            print(f"{threads:>9}  {hot:>12.0f} ch/s  {spread:>7.0f} ch/s  {hot / spread:>6.2f}")
    finally:
        admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
        with connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS quarry_bench_contention WITH (FORCE)")


if __name__ == "__main__":
    main()
