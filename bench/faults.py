"""The job-ledger faults on the sample, with figures: each scenario runs the same job on real
processes (a real S3 server on loopback, a private redis-server, the three pools, the dispatcher), with every
ledger setting at its default (a 300 s lease), and injects one fault mid-job; each line says how
much longer the job took than the same job without a fault, in the same run. The fault-free job
runs first and again last: the difference between the two is the run's own noise.

Run: python -m bench.faults [--dataset ../shared/fashion-sample] [--images N] [--only NAME ...].
Uses the tests' PostgreSQL (tests/postgres.py: the machine's where it offers pgvector, which the
model's embeddings need, else an embedded one; a scratch database, dropped after). Process handling comes
from tests/stack.py, the same helpers the fault tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import psycopg

from common.db import connect, ensure_database
from common.paths import default_dataset_path
from tests.postgres import pg_url
from tests.stack import BIN, POOLS, Stack, start_s3, wait_until

WITH_IMAGES = "SELECT s.id FROM styles s JOIN images i USING (id) WHERE i.status = 'stored'"
JOB = ("--augment", "rotate(limit=15) | resize(224, 224)", "--variants", "2", "--model", "default")
MIB = 1024 * 1024
FIRST_IDS = "(SELECT max(id) FROM (SELECT id FROM images WHERE status = 'stored' ORDER BY id LIMIT {n}) f)"


class Bench:
    def __init__(self, env: dict[str, str], root: Path, s3: subprocess.Popen[bytes]) -> None:
        self.env, self.root, self.s3 = env, root, s3
        self.baseline_s: float | None = None

    def stack(self, name: str) -> Stack:
        stack = Stack(self.env, self.root / name.replace(" ", "-").replace(",", ""))
        stack.start_redis()
        stack.start_pools()
        stack.start_dispatcher()
        return stack

    def objects(self, job_id: str) -> tuple[int, int]:
        client = boto3.client(
            "s3",
            endpoint_url=self.env["S3_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        count = size = 0
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.env["OUTPUT_BUCKET"], Prefix=f"{job_id}/"
        ):
            for item in page.get("Contents", []):
                count, size = count + 1, size + item["Size"]
        return count, size

    def scenario(self, name: str, fault: Callable[[Stack], None], query: str, when: float) -> float:
        """Run the job with `fault` once `when` of its items are done (the transform pool
        renders a chunk far ahead of its inference, so a fault of that pool comes at the
        start); print its line; its seconds."""
        stack = self.stack(name)
        peak = {"redis": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # the broker is down in one scenario
                    peak["redis"] = max(peak["redis"], int(stack.redis().info("memory")["used_memory"]))
                time.sleep(1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            started = time.monotonic()
            job_id = stack.submit(query, *JOB)
            total = stack.progress(job_id).total
            wait_until(lambda: stack.progress(job_id).done >= total * when, 600, f"{when:.0%} done", 0.2)
            fault(stack)
            wait_until(lambda: stack.progress(job_id).ended, 1800, "the job", 0.5)
            end = stack.progress(job_id)
            seconds = time.monotonic() - started
            stop.set()
            sampler.join()
            count, _ = self.objects(job_id)
            extra = "" if self.baseline_s is None else f"  (+{seconds - self.baseline_s:5.1f} s)"
            print(
                f"{name:<40} items {end.total:>6}  done {end.done:>6}  failed {end.failed:>3}"
                f"  objects {count:>6}  re-sent chunks {stack.redispatched(job_id):>3}"
                f"  job {seconds:6.1f} s{extra}  Redis peak {peak['redis'] / MIB:6.1f} MiB",
                flush=True,
            )
            return seconds
        finally:
            stack.stop_all()


def kill_pool(queue: str) -> Callable[[Stack], None]:
    """SIGKILL a pool while it holds an unfinished chunk; its supervisor restarts it 5 s later."""

    def fault(stack: Stack) -> None:
        stack.kill_pool_mid_chunk(queue)
        time.sleep(5)
        stack.start_pool(queue)

    return fault


def kill_node(stack: Stack) -> None:
    """SIGKILL every pool at once, as a node that vanishes; its pools come back 5 s later."""
    for queue in POOLS:
        stack.stop(f"worker-{queue}", signal.SIGKILL)
    time.sleep(5)
    stack.start_pools()


def terminate_pool(stack: Stack) -> None:
    """SIGTERM the transform pool (a scale-down); it is started again once it has exited."""
    stack.terminate("worker-transform")
    stack.start_pool("transform")


def lose_broker(stack: Stack) -> None:
    stack.stop("redis", signal.SIGKILL)
    time.sleep(3)
    stack.start_redis()
    for _ in range(20):  # as the pools' supervisor: one that ended with the broker starts again
        stack.restart_exited_pools()
        time.sleep(0.5)


def terminate_connections(stack: Stack) -> None:
    database = stack.env["DATABASE_URL"].rsplit("/", 1)[1]
    with psycopg.connect(pg_url("postgres"), autocommit=True) as admin:
        ends = time.monotonic() + 10
        while time.monotonic() < ends:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=default_dataset_path())
    parser.add_argument("--images", type=int, default=None, help="select only the first N stored images")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    name = f"quarry_faults_{uuid.uuid4().hex[:8]}"
    root = Path(tempfile.mkdtemp(prefix="quarry-faults-"))
    s3 = start_s3(root)
    env = {
        "DATABASE_URL": pg_url(name),
        **s3.env(),
        "DATASET_PATH": str(args.dataset),
        "RAW_BUCKET": "bench-raw",
        "OUTPUT_BUCKET": "bench-out",
    }
    query = (
        WITH_IMAGES if args.images is None else f"{WITH_IMAGES} AND s.id <= {FIRST_IDS.format(n=args.images)}"
    )
    bench = Bench(env, root, s3.process)

    def freeze_s3(_stack: Stack) -> None:
        os.kill(s3.process.pid, signal.SIGSTOP)
        time.sleep(30)
        os.kill(s3.process.pid, signal.SIGCONT)

    scenarios: dict[str, tuple[str, Callable[[Stack], None], float]] = {
        "none": ("no fault (baseline)", lambda _s: None, 0),
        "transform": ("transform pool SIGKILLed, back in 5 s", kill_pool("transform"), 0),
        "upload": ("upload pool SIGKILLed, back in 5 s", kill_pool("upload"), 0.25),
        "inference": ("inference pool SIGKILLed, back in 5 s", kill_pool("inference"), 0.25),
        "node": ("every pool SIGKILLed at once, back in 5 s", kill_node, 0.1),
        "broker": ("Redis killed, restarted empty", lose_broker, 0.25),
        "sigterm": ("transform pool sent SIGTERM, started again", terminate_pool, 0),
        "postgres": ("PG connections killed for 10 s", terminate_connections, 0.25),
        "s3": ("S3 server frozen 30 s", freeze_s3, 0.25),
    }
    try:
        ensure_database(env["DATABASE_URL"])
        subprocess.run(
            [str(BIN / "producer"), "ingest"], env={**os.environ, **env}, check=True, capture_output=True
        )
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores; dataset {args.dataset}"
            f" ({'every stored image' if args.images is None else f'the first {args.images} stored images'});"
            f" job {' '.join(JOB)}; default settings (lease 300 s); pools: transform 2 processes,"
            f" upload 8 threads, inference 1; S3: {s3.describe()}"
        )
        for key, (label, fault, when) in scenarios.items():
            if not args.only or key in args.only or key == "none":
                seconds = bench.scenario(label, fault, query, when)
                if key == "none":
                    bench.baseline_s = seconds
        bench.scenario("no fault again (the run's noise)", lambda _s: None, query, 0)
    finally:
        s3.stop()
        with connect(pg_url("postgres"), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        print(f"logs: {bench.root}", file=sys.stderr)


if __name__ == "__main__":
    main()
