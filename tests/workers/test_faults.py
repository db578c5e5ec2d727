"""Jobs finish by themselves through faults: real pools, dispatchers and a private redis-server
that the tests kill, a frozen S3 server, PostgreSQL connections terminated under the stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from common.config import Settings, stage_time_limits
from common.datasets import FASHION
from common.jobs import job_progress
from common.storage import ObjectStore
from producer.watchdog import EXIT_STALLED
from tests.conftest import BIN, WITH_IMAGES, PrivateDatabase, boto3_client
from tests.partition import SilentLink
from tests.postgres import pg_port, pg_url
from tests.stack import POOLS, S3Server, Stack, wait_until

IMAGES = 295  # stored images of the vendored sample
JOB = ("--augment", "hflip | rotate(limit=15) | resize(224, 224)", "--variants", "2", "--chunk-size", "10")
LEASE_S = 10
MIB = 1024 * 1024
REDIS_RECONNECT_S = 40  # a worker's consumer back after a silent Redis link (workers/celeryconfig.py)


@pytest.fixture(scope="module")
def fault_env(private_database: PrivateDatabase) -> Iterator[dict[str, str]]:
    """A database of its own (the session's dispatcher must not see these jobs), ingested."""
    with private_database("fault", CHUNK_LEASE_S=str(LEASE_S), DISPATCH_INTERVAL_S="0.2") as env:
        yield env


@pytest.fixture
def stack(fault_env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """A private redis-server; each test starts the pools and dispatchers it needs."""
    stack = Stack(fault_env, tmp_path / "stack")
    stack.start_redis()
    yield stack
    stack.stop_all()


def submit(stack: Stack, *args: str) -> str:
    return stack.submit(WITH_IMAGES, *args)


def wait_for_progress(stack: Stack, job_id: str, items: int, timeout: float = 120) -> None:
    """Wait until at least `items` items are recorded, and the job is not finished yet."""
    wait_until(lambda: stack.progress(job_id).done >= items, timeout, f"{items} items done")
    assert not stack.progress(job_id).ended, "the job ended before the fault: make it bigger"


def kill_transform_pool(stack: Stack) -> None:
    """SIGKILL the pool (main process and children at once) while it holds an unfinished chunk:
    transform outruns the later stages, so a kill at a random moment can land between chunks."""
    stack.kill_pool_mid_chunk("transform")
    time.sleep(5)


def kill_broker(stack: Stack) -> None:
    stack.stop("redis", signal.SIGKILL)  # no persistence: every queued message is gone
    time.sleep(3)


def restart_broker(stack: Stack) -> None:
    """A new broker; for 10 s, act as the pools' supervisor (they reconnect, or end and restart)."""
    stack.start_redis()
    for _ in range(20):
        stack.restart_exited_pools()
        time.sleep(0.5)


@pytest.mark.parametrize(
    ("done_before", "fault", "restart"),
    [
        pytest.param(1, kill_transform_pool, lambda s: s.start_pool("transform"), id="transform-pool-killed"),
        pytest.param(40, kill_broker, restart_broker, id="broker-lost"),
    ],
)
def test_a_lost_process_mid_job_is_healed_by_leases(
    stack: Stack,
    store: ObjectStore,
    settings: Settings,
    done_before: int,
    fault: Callable[[Stack], None],
    restart: Callable[[Stack], None],
) -> None:
    stack.start_pools()
    stack.start_dispatcher()
    job_id = submit(stack, *JOB)
    wait_for_progress(stack, job_id, done_before)
    fault(stack)
    restart(stack)
    stack.wait_ended(job_id, LEASE_S + 60)
    stack.assert_finished_cleanly(job_id, IMAGES * 2, store, settings.output_bucket)
    assert stack.redispatched(job_id) > 0


def test_a_killed_inference_pool_loses_no_shard(stack: Stack, store: ObjectStore, settings: Settings) -> None:
    """WebDataset with a model: the inference pool is SIGKILLed holding staged shards; their
    leases run out, transform stages them again, and every shard ends written once, complete."""
    stack.start_pools()
    stack.start_dispatcher()
    job_id = submit(stack, *JOB[:4], "--output", "webdataset", "--shard-size", "10", "--model", "default")
    wait_for_progress(stack, job_id, 40)
    stack.kill_pool_mid_chunk("inference")
    time.sleep(5)
    stack.start_pool("inference")
    final = stack.wait_ended(job_id, LEASE_S + 90)
    assert (final.state, final.failed, final.done, final.total) == ("finished", 0, IMAGES * 2, IMAGES * 2)
    keys = store.list_keys(settings.output_bucket, f"{job_id}/shards/")
    shards = -(-IMAGES // 10)
    assert len([k for k in keys if k.endswith(".tar")]) == shards
    assert len([k for k in keys if k.endswith((".parquet", "_stats.json"))]) == 2 * shards
    assert not [k for k in keys if "/_staging/" in k]
    assert stack.redispatched(job_id) > 0


def test_postgresql_connections_terminated_for_10_s_lose_nothing(
    stack: Stack, store: ObjectStore, settings: Settings
) -> None:
    stack.start_pools()
    stack.start_dispatcher()
    job_id = submit(stack, *JOB)
    wait_for_progress(stack, job_id, 40)
    database = stack.env["DATABASE_URL"].rsplit("/", 1)[1]
    terminated = 0
    with psycopg.connect(pg_url("postgres"), autocommit=True) as admin:
        storm_ends = time.monotonic() + 10
        while time.monotonic() < storm_ends:
            terminated += admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()[0]
            time.sleep(0.5)
    assert terminated >= 10
    stack.wait_ended(job_id, LEASE_S + 60)
    stack.assert_finished_cleanly(job_id, IMAGES * 2, store, settings.output_bucket)


@pytest.mark.parametrize(
    "done_before",
    [
        pytest.param(0, id="during-the-ranged-reads"),  # frozen before a chunk's raw bytes are read
        pytest.param(40, id="mid-job"),
    ],
)
def test_a_frozen_s3_server_loses_nothing(
    stack: Stack,
    store: ObjectStore,
    settings: Settings,
    s3_server: S3Server,
    done_before: int,
) -> None:
    """The sample is packed (one shard), so every raw read is a ranged GET of it."""
    stack.env["CHUNK_LEASE_S"] = "20"  # stages blocked on S3 cannot renew: 30 s = 2 leases
    stack.start_pools()
    stack.start_dispatcher()
    job_id = submit(stack, *JOB)
    wait_for_progress(stack, job_id, done_before)
    s3 = s3_server.process
    os.kill(s3.pid, signal.SIGSTOP)
    try:
        time.sleep(30)
    finally:
        os.kill(s3.pid, signal.SIGCONT)
    stack.wait_ended(job_id, 20 + 60)
    stack.assert_finished_cleanly(job_id, IMAGES * 2, store, settings.output_bucket)


def test_a_stopped_upload_pool_holds_redis_memory_down(stack: Stack, settings: Settings) -> None:
    """Noisy 448x448 PNGs (~0.5 MB each, 1,180 of them) would put over 500 MiB in Redis if
    transform ran ahead; back-pressure keeps the upload queue at UPLOAD_BACKLOG_MESSAGES."""
    stack.env["CHUNK_LEASE_S"] = "120"  # the stop is shorter than a lease: nothing is re-sent
    stack.start_pools()
    stack.start_dispatcher()
    client = stack.redis()
    peak = {"used": 0, "queued": 0, "samples": 0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            peak["used"] = max(peak["used"], int(client.info("memory")["used_memory"]))
            peak["queued"] = max(peak["queued"], int(client.llen("upload")))
            peak["samples"] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    job_id = submit(
        stack,
        "--augment",
        "resize(448, 448) | gaussian_noise(std=(0.03, 0.05))",
        "--format",
        "png",
        "--variants",
        "4",
        "--chunk-size",
        "20",
    )
    wait_for_progress(stack, job_id, 20)
    stack.stop("worker-upload")  # warm shutdown: what it had not started goes back to the queue
    waiting = "waits for room in upload"
    wait_until(  # every transform process stopped by back-pressure: it can make nothing more
        lambda: stack.log("worker-transform").count(waiting) >= POOLS["transform"][1],
        240,
        "every transform process to wait for room in the upload queue",
    )
    held_back = stack.progress(job_id)
    stack.start_pool("upload")
    final = stack.wait_ended(job_id, 240)
    sampling.set()
    sampler.join()
    assert peak["samples"] > 0  # the sampler ran (an error in it fails the test's thread loudly)
    produced = sum(size for _, size in store_sizes(settings, job_id))
    assert produced > 400 * MIB, "the job must be big enough for an unbounded queue to show"
    assert (final.state, final.done, final.failed) == ("finished", IMAGES * 4, 0)
    assert held_back.done < final.total
    assert peak["used"] < 256 * MIB, peak
    assert peak["queued"] >= settings.upload_backlog_messages - 2, peak  # transform was held back


def store_sizes(settings: Settings, job_id: str) -> list[tuple[str, int]]:
    client = boto3_client(settings)
    sizes = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=settings.output_bucket, Prefix=f"{job_id}/"
    ):
        sizes.extend((item["Key"], item["Size"]) for item in page.get("Contents", []))
    return sizes


def test_a_million_ids_are_recorded_in_bounded_memory(stack: Stack) -> None:
    url = stack.env["DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS synthetic_ids")
        conn.execute("CREATE TABLE synthetic_ids AS SELECT generate_series(1, 1000000)::bigint AS id")
        conn.execute("GRANT SELECT ON synthetic_ids TO quarry_reader")  # selections run as that role
    stack.start_dispatcher()  # no workers: chunks are dispatched into Redis up to the budget only
    measure = (
        "import resource, subprocess, sys, time; t = time.perf_counter();"
        " r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        " print(r.stdout.strip(), time.perf_counter() - t,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, r.returncode)"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            measure,
            str(BIN / "producer"),
            "run",
            "--query",
            "SELECT id FROM synthetic_ids",
        ],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        check=True,
    )
    job_id, seconds, peak_mib, code = result.stdout.split()
    print(f"1,000,000 ids: producer run {float(seconds):.2f} s, peak {float(peak_mib):.0f} MiB")
    try:
        assert code == "0"
        assert float(peak_mib) <= 150, peak_mib  # speed is bench.selection's: no wall-clock limit here
        budget = Settings().dispatch_budget_chunks

        def in_flight() -> int:
            with psycopg.connect(url) as conn:
                sent = "SELECT count(*) FROM job_chunks WHERE job_id = %s AND state = 'dispatched'"
                return int(conn.execute(sent, (job_id,)).fetchone()[0])  # type: ignore[index]

        wait_until(lambda: in_flight() >= budget, 60, "the dispatch budget to be filled")
        stack.wait_ticked()
        assert in_flight() == budget  # and not one more
        assert int(stack.redis().info("memory")["used_memory"]) <= 16 * MIB
        with psycopg.connect(url, autocommit=True) as conn:
            found = job_progress(conn, job_id)
        assert found is not None and found.total == 1_000_000 and found.chunks == 10_000
        assert found.state == "running" and found.slicing is not None  # recorded whole
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
            conn.execute("DROP TABLE synthetic_ids")


def test_two_dispatchers_never_send_a_chunk_twice_and_survive_one_killed(
    stack: Stack, store: ObjectStore, settings: Settings
) -> None:
    budget = 4  # many small ticks, so the two dispatchers contend
    stack.env["DISPATCH_BUDGET_CHUNKS"] = str(budget)
    stack.start_pools()
    stack.start_dispatcher("dispatcher-a")
    stack.start_dispatcher("dispatcher-b")
    job_id = submit(stack, *JOB)
    wait_for_progress(stack, job_id, 200)
    attempts_sql = "SELECT count(*), sum(dispatches), max(dispatches) FROM job_chunks WHERE job_id = %s"
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        chunks, _, most = conn.execute(attempts_sql, (job_id,)).fetchone()
    assert most == 1  # both running, no chunk was claimed twice
    stack.stop("dispatcher-a", signal.SIGKILL)
    stack.wait_ended(job_id, LEASE_S + 60)
    stack.assert_finished_cleanly(job_id, IMAGES * 2, store, settings.output_bucket)
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        _, attempts, _ = conn.execute(attempts_sql, (job_id,)).fetchone()
    assert attempts <= chunks + budget  # at most the claim the kill cut off was sent again


def test_a_dispatcher_cut_off_mid_claim_exits_and_its_successor_finishes_the_job(
    stack: Stack, store: ObjectStore, settings: Settings
) -> None:
    """A network partition between the dispatcher and PostgreSQL, inside its claim transaction:
    no error ever comes, the loop blocks. The watchdog ends the process (code 3) for its supervisor
    to restart, and the server ends the abandoned transaction, so the successor can take the
    dispatch lock. A budget of 4 chunks means the job cannot finish without a dispatcher."""
    stall_s = 5
    stack.env["DISPATCH_BUDGET_CHUNKS"] = "4"
    stack.env["DISPATCH_STALL_S"] = str(stall_s)
    link = SilentLink(("127.0.0.1", pg_port()))
    try:
        through_link = (
            stack.env["DATABASE_URL"].replace(f":{pg_port()}/", f":{link.port}/") + "?sslmode=disable"
        )
        stack.start_pools()
        stack.start_dispatcher("dispatcher-cut-off", env={"DATABASE_URL": through_link})
        job_id = submit(stack, *JOB)
        wait_for_progress(stack, job_id, 40)
        link.silence_after(b"BEGIN", then=1)  # the claim's first statement takes the dispatch lock
        assert stack.wait_exit("dispatcher-cut-off", stall_s + 15) == EXIT_STALLED
        assert "stalled: no progress for" in stack.log("dispatcher-cut-off")
        stack.start_dispatcher("dispatcher-restarted")
        stack.wait_ended(job_id, stall_s + LEASE_S + 60)
        stack.assert_finished_cleanly(job_id, IMAGES * 2, store, settings.output_bucket)
    finally:
        link.close()


@pytest.mark.parametrize(
    ("variable", "marker"),
    [
        # the transform's catalog look-up, after it opened the chunk (its attempt is counted)
        pytest.param("DATABASE_URL", b"FROM locations", id="postgresql"),
        # the transform's hand-off of rendered images to the upload queue
        pytest.param("CELERY_BROKER_URL", b"LPUSH", id="redis"),
    ],
)
def test_a_pool_whose_link_goes_silent_mid_chunk_finishes_the_job(
    stack: Stack, store: ObjectStore, settings: Settings, variable: str, marker: bytes
) -> None:
    """A partition between the transform pool and PostgreSQL (or Redis) that drops the bytes of
    the connections open at that moment, without closing them: no error ever comes by itself.
    The stage's time limit (from the lease) or the broker's socket timeout ends the wait, the
    lease machinery sends the chunk again, and reconnections get through."""
    port = pg_port() if variable == "DATABASE_URL" else stack.redis_port
    link = SilentLink(("127.0.0.1", int(port or 0)), new_connections_pass=True)
    try:
        through_link = stack.env[variable].replace(f":{port}/", f":{link.port}/")
        if variable == "DATABASE_URL":
            through_link += "?sslmode=disable"  # the marker must be readable on the wire
        stack.start_pool("transform", env={variable: through_link})
        stack.start_pool("upload")
        stack.start_pool("inference")
        # armed before the job, so that the fault lands mid-job whatever the stages' speeds: the
        # third chunk's look-up, or the third hand-off (waiting for progress first let the
        # transform finish every look-up of the job before the link was armed)
        link.silence_after(marker, occurrence=3)
        stack.start_dispatcher()
        job_id = submit(stack, *JOB)
        wait_until(link.silent.is_set, 60, "the link to go silent")
        assert not stack.progress(job_id).ended
        # PostgreSQL: the chunk is noted failed at the soft limit, or its lease runs out after
        # the hard one, and it is sent again. Redis: the worker's own connections time out one
        # after another (each command 2 x the socket timeout) before its consumer reconnects;
        # measured about 55 s. The bound is a deadline for the wait, not an assertion.
        _, hard_limit_s = stage_time_limits(Settings(chunk_lease_s=LEASE_S))
        bound = LEASE_S + hard_limit_s + (0 if variable == "DATABASE_URL" else REDIS_RECONNECT_S)
        stack.wait_ended(job_id, 2 * bound + 60)
        stack.assert_finished_cleanly(job_id, IMAGES * 2, store, settings.output_bucket)
        if variable == "DATABASE_URL":  # the silenced worker could not record its chunk
            assert stack.redispatched(job_id) > 0
    finally:
        link.close()


def test_a_pool_killed_mid_ingest_registers_every_row_exactly_once(
    stack: Stack, store: ObjectStore, tmp_path: Path
) -> None:
    """A Parquet manifest of 16 row groups registered by the transform pool, which is SIGKILLed
    while it holds an unregistered unit and started again: the ingest ends by itself, 0 lost."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, groups = 320_000, 16
    ids = pa.array(range(rows), pa.int64())
    table = pa.table(
        {
            "image_id": ids,
            "uri": pa.array([f"s3://elsewhere/{i}.jpg" for i in range(rows)]),
            "caption": pa.array([f"item {i}" for i in range(rows)]),
        }
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=rows // groups)
    store.ensure_bucket("fault-manifests")
    store.upload_file(str(tmp_path / "big.parquet"), "fault-manifests", "big.parquet", content_type="x")
    stack.start_pools()
    stack.start_dispatcher()
    name = f"big_{uuid.uuid4().hex[:6]}"
    ingest = subprocess.Popen(
        [
            str(BIN / "producer"),
            "ingest",
            "s3://fault-manifests/big.parquet",
            "--dataset",
            name,
            "--id-column",
            "image_id",
            "--image-column",
            "uri",
            "--json",
        ],
        env={**os.environ, **stack.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stack.kill_pool_mid_chunk("transform")
    stack.start_pool("transform")
    out, err = ingest.communicate(timeout=LEASE_S + 120)
    assert ingest.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["rows"], summary["images"], summary["units_failed"]) == (rows, rows, 0)
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        counted = conn.execute(f"SELECT count(*), count(DISTINCT image_id) FROM {name}").fetchone()
        located = conn.execute(
            "SELECT count(*) FROM locations l JOIN datasets d ON d.id = l.dataset WHERE d.name = %s", (name,)
        ).fetchone()
    assert counted == (rows, rows) and located == (rows,)
    assert stack.redispatched(summary["job_id"]) > 0  # the unit the pool held was sent again


def test_a_new_job_wakes_a_dispatcher_between_its_ticks(stack: Stack) -> None:
    """The dispatcher sleeps DISPATCH_INTERVAL_S (60 s here) between ticks unless a NOTIFY from a
    recorded job cuts the sleep short: the dispatcher says it was woken, and the chunks leave."""
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        before = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    stack.start_dispatcher(env={"DISPATCH_INTERVAL_S": "60"})

    def has_ticked() -> bool:
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            row = conn.execute("SELECT max(seen_at) FROM dispatchers").fetchone()
        return row is not None and row[0] is not None and row[0] > before

    wait_until(has_ticked, 60, "the dispatcher's first tick")
    job_id = submit(stack, *JOB, "--dataset", FASHION)  # the ingest test above added a dataset

    def dispatched() -> int:
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            sent = "SELECT count(*) FROM job_chunks WHERE job_id = %s AND dispatches > 0"
            return int(conn.execute(sent, (job_id,)).fetchone()[0])  # type: ignore[index]

    wait_until(lambda: dispatched() > 0, 120, "the new job's first chunks dispatched")
    assert "woken by a new or retried job" in stack.log("dispatcher")  # the NOTIFY ended its sleep
