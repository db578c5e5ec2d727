"""Quarry's first task against the libraries users would pick instead, side by side in one run on
one real S3 server (the JuiceFS gateway, producer/s3_gateway.py): images stored one object each, a
Parquet manifest (id, master_category, article_type, uri), the rows of two categories selected,
each image decoded, resized to 224x224, encoded as JPEG and written as one object (Quarry's
`webdataset` output writes shards instead).

- Daft (native runner) and Ray Data run from the peers' own environment (`make .venv-peers`),
  bench/peer_jobs/*_job.py; Quarry runs as `make up` starts it: a dispatcher, the three pools at the
  local stack's concurrency, a redis-server, PostgreSQL at 127.0.0.1:5432 (a scratch database).
- Tiers: the sample's images (3,000 of them selected), the same repeated under new keys to
  30,000, and 1,024-px photographs (bench/photographs.py).
- The bound: the S3 server's own CPU per GET and per PUT, measured from its process's CPU time
  over the tier's set-up requests; with every core given to the server, one GET and one PUT an
  image cannot go faster than cores / (GET + PUT CPU).
- `--profile`: py-spy samples the pools during Quarry's files run; where an image's time goes.

Run: python -m bench.peers [--tiers sample,repeated,photographs] [--systems daft,ray,files,webdataset]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import cv2
import kombu.utils.json
import numpy as np
import psutil
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.config import Config

from bench.photographs import jpeg_photographs
from common.augment import parse_spec
from common.augment.pipeline import Pipeline
from common.augment.sizing import spec_floor
from common.catalog import CatalogStats, RejectedLine, read_styles
from common.config import Settings
from common.db import connect, ensure_database
from common.images import decode, encode
from common.jobs import job_progress
from common.jobspec import JobSpec
from common.paths import default_dataset_path
from common.sources import Source
from common.storage import ObjectStore
from common.transform import Output
from producer import s3_gateway
from tests.stack import BIN, Stack, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
KEY, SECRET = "bench", "bench-secret-key"
RAW, OUT = "peers-raw", "peers-out"
CATEGORIES = ["Apparel", "Footwear"]
SIDE = 224
# the local stack's pools (deploy/local/stack.sh): what `make up` gives a user
POOLS = {"transform": ("prefork", 2), "upload": ("threads", 16), "inference": ("prefork", 1)}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STEP_IMAGES = 1000  # images each step is timed over, alone (step_costs)
BOUND_REQUESTS = 3000  # requests of each kind the bound is measured over


@dataclass
class Tier:
    name: str
    images: Callable[[], Iterator[tuple[int, str, str, bytes]]]  # (id, category, article, JPEG)
    count: int
    selected: int = 0
    get_ms: float = 0.0
    put_ms: float = 0.0
    ids: list[int] = field(default_factory=list)
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)  # system: (img/s, server ms/img)

    @property
    def bound(self) -> float:
        return (os.cpu_count() or 1) * 1000 / (self.get_ms + self.put_ms)


def sample_images(dataset: Path, repeats: int) -> Callable[[], Iterator[tuple[int, str, str, bytes]]]:
    """The sample's images with their categories, `repeats` times under new ids."""

    def images() -> Iterator[tuple[int, str, str, bytes]]:
        rows = [
            row
            for row in read_styles(dataset / "styles.csv", CatalogStats())
            if not isinstance(row, RejectedLine)
        ]
        for repeat in range(repeats):
            for row in rows:
                path = dataset / "images" / f"{row[0]}.jpg"
                if path.exists():
                    yield repeat * 1_000_000 + row[0], row[2] or "", row[4] or "", path.read_bytes()

    return images


def photograph_images(count: int) -> Callable[[], Iterator[tuple[int, str, str, bytes]]]:
    """1,024-px photographs; three of four in the selected categories, as in the sample."""

    def images() -> Iterator[tuple[int, str, str, bytes]]:
        kinds = [*CATEGORIES, CATEGORIES[0], "Accessories"]
        for index, jpeg in enumerate(jpeg_photographs(1024, count)):
            yield index + 1, kinds[index % 4], "Photograph", jpeg

    return images


def server_cpu(pid: int) -> float:
    """Seconds of CPU the process has used (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_label(process: psutil.Process) -> str:
    """Which part of the run a process is: the S3 server, PostgreSQL, Redis, a pool, a peer."""
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return "other"
    for needle, label in (
        ("juicefs", "S3 server"),
        (": quarry_worker ", "PostgreSQL, the pools' sessions"),
        (": quarry_dispatcher ", "PostgreSQL, the dispatcher's session"),
        ("postgres", "PostgreSQL"),
        ("redis-server", "Redis"),
        ("-Q transform", "transform pool"),
        ("-Q upload", "upload pool"),
        ("-Q inference", "inference pool"),
        ("producer dispatch", "dispatcher"),
        (".venv-peers", "peer"),
        ("ray", "peer"),
    ):
        if needle in command:
            return label
    return "other"


def cpu_by_label() -> dict[str, float]:
    """CPU seconds used so far by every process on the machine, summed by `process_label`; what
    a process's ended children used (PostgreSQL's backends, the peer jobs) counts as its own."""
    used: dict[str, float] = {}
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
            label = process_label(process)
        except psutil.Error:
            continue
        used[label] = used.get(label, 0.0) + times.user + times.system
        ended = "peer job or CLI" if process.pid == os.getpid() else label
        used[ended] = used.get(ended, 0.0) + times.children_user + times.children_system
    return used


def s3_client(endpoint: str) -> object:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(max_pool_connections=16),
    )


def store_tier(tier: Tier, s3: object, server: int) -> str:
    """PUT the tier's images and its manifest, and measure the server's CPU per request. The
    manifest's URI."""
    ids, categories, articles, uris = [], [], [], []

    def put(item: tuple[int, str, str, bytes]) -> None:
        s3.put_object(Bucket=RAW, Key=f"{tier.name}/{item[0]}.jpg", Body=item[3])  # type: ignore[attr-defined]

    with ThreadPoolExecutor(8) as pool:
        batch: list[tuple[int, str, str, bytes]] = []
        for item in tier.images():
            ids.append(item[0])
            categories.append(item[1])
            articles.append(item[2])
            uris.append(f"s3://{RAW}/{tier.name}/{item[0]}.jpg")
            batch.append(item)
            if len(batch) == 256:
                list(pool.map(put, batch))
                batch = []
        list(pool.map(put, batch))
    tier.get_ms, tier.put_ms = request_costs(tier, ids[:BOUND_REQUESTS], s3, server)
    tier.count, tier.ids = len(ids), ids
    tier.selected = sum(category in CATEGORIES for category in categories)
    table = pa.table({"id": ids, "master_category": categories, "article_type": articles, "uri": uris})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    s3.put_object(Bucket=RAW, Key=f"{tier.name}/manifest.parquet", Body=buffer.getvalue())  # type: ignore[attr-defined]
    return f"s3://{RAW}/{tier.name}/manifest.parquet"


def request_costs(tier: Tier, ids: list[int], s3: object, server: int) -> tuple[float, float]:
    """The server's CPU (ms) per GET of a stored image and per PUT of a rendered output (224 px
    JPEG), one request at a time on one connection, as the issue that set the bound measured."""
    before = server_cpu(server)
    raws = [s3.get_object(Bucket=RAW, Key=f"{tier.name}/{i}.jpg")["Body"].read() for i in ids]  # type: ignore[attr-defined]
    get_ms = (server_cpu(server) - before) * 1000 / len(ids)
    outputs = [rendered(raw) for raw in raws]
    before = server_cpu(server)
    for image_id, output in zip(ids, outputs, strict=True):
        s3.put_object(Bucket=OUT, Key=f"bound/{tier.name}/{image_id}.jpg", Body=output)  # type: ignore[attr-defined]
    return get_ms, (server_cpu(server) - before) * 1000 / len(ids)


def rendered(raw: bytes) -> bytes:
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    small = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    return bytes(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])


def step_costs(tier: Tier, ids: list[int], env: dict[str, str]) -> dict[str, float]:
    """CPU ms an image spends in each step of Quarry's files output, each step alone in this
    process over `ids` (process CPU time, so obstore's own threads count): the GET and the PUT
    with obstore (what the pools use) and boto3 (what they used before), decode, render and
    encode with Quarry's functions, and the message (kombu's JSON there and back, with the
    Redis transport's base64 of the body). The ledger's share is PostgreSQL's CPU in the run."""
    endpoint = env["S3_ENDPOINT_URL"]
    settings = Settings(s3_endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET)
    store, client = ObjectStore(settings), s3_client(endpoint)
    sources = [Source(f"s3://{RAW}/{tier.name}/{i}.jpg") for i in ids]
    costs: dict[str, float] = {}

    def timed(step: str, work: Callable[[], object]) -> object:
        started = time.process_time()
        result = work()
        costs[step] = (time.process_time() - started) * 1000 / len(ids)
        return result

    raws = timed("fetch (obstore)", lambda: [store.read(source)[0] for source in sources])
    timed(
        "fetch (boto3)",
        lambda: [client.get_object(Bucket=RAW, Key=f"{tier.name}/{i}.jpg")["Body"].read() for i in ids],  # type: ignore[attr-defined]
    )
    stages = parse_spec(f"resize({SIDE}, {SIDE})").stages
    spec = JobSpec(job_id="steps", augment=stages, decode_floor=spec_floor(stages, False))
    floor = (spec.decode_floor[0], spec.decode_floor[1]) if spec.decode_floor else None
    pipeline = Pipeline.from_spec(spec.augment)
    pixels = timed("decode", lambda: [decode(raw, floor, settings.image_max_pixels) for raw in raws])  # type: ignore[attr-defined]
    rendered = timed("render", lambda: [pipeline.apply(p, seed=(0, 0, 0)) for p in pixels])  # type: ignore[attr-defined]
    jpegs = timed("encode", lambda: [encode(image, "jpeg", spec.quality) for image in rendered])  # type: ignore[attr-defined]
    outputs = [Output(i, 0, n, jpeg, "jpeg", "") for n, (i, jpeg) in enumerate(zip(ids, jpegs, strict=True))]
    timed(
        "message", lambda: [Output.from_message(m) for m in through_broker([o.to_message() for o in outputs])]
    )
    timed(
        "PUT (obstore)",
        lambda: [
            store.put(OUT, f"steps/{o.image_id}.jpg", o.data, content_type="image/jpeg", metadata={})
            for o in outputs
        ],
    )
    timed(
        "PUT (boto3)",
        lambda: [client.put_object(Bucket=OUT, Key=f"steps/{o.image_id}.jpg", Body=o.data) for o in outputs],  # type: ignore[attr-defined]
    )
    return costs


def through_broker(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the upload task's argument travels: kombu's JSON, the Redis transport's base64
    body, and back, one message of 64 outputs at a time."""
    back: list[dict[str, Any]] = []
    for start in range(0, len(messages), 64):
        body = base64.b64encode(kombu.utils.json.dumps(messages[start : start + 64]).encode())
        back += kombu.utils.json.loads(base64.b64decode(body))
    return back


def run_peer(system: str, tier: Tier, manifest: str, endpoint: str) -> float:
    """Seconds the peer's job took (its own clock, start-up excluded)."""
    config = {
        "endpoint": endpoint,
        "key": KEY,
        "secret": SECRET,
        "manifest": manifest,
        "categories": CATEGORIES,
        "side": SIDE,
        "out": f"s3://{OUT}/{tier.name}/{system}",
    }
    script = ROOT / "bench" / "peer_jobs" / f"{system}_job.py"
    done = subprocess.run(
        [str(PEERS_PYTHON), str(script), json.dumps(config)], capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(f"{system} failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["images"] != tier.selected:
        raise RuntimeError(f"{system} wrote {result['images']} images, not {tier.selected}")
    return float(result["seconds"])


def run_quarry(stack: Stack, output: str, tier: Tier, profile: Path | None) -> float:
    """Seconds from `producer run` to the job's end (CLI start-up included)."""
    dataset = f"peers_{tier.name}"
    query = f"SELECT id FROM {dataset} WHERE master_category IN ({', '.join(repr(c) for c in CATEGORIES)})"
    spy = start_profile(stack, profile) if profile else None
    started = time.monotonic()
    job_id = stack.submit(
        query, "--dataset", dataset, "--augment", f"resize({SIDE}, {SIDE})", "--output", output
    )
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:  # one connection, 10 looks/s
        wait_until(lambda: job_progress(conn, job_id).ended, 3600, "the job", 0.1)  # type: ignore[union-attr]
        seconds = time.monotonic() - started
        end = job_progress(conn, job_id)
    if spy and profile:
        stop_profile(spy)
        for pool, steps in profile_shares(profile).items():
            print(f"    profile, {pool} pool: " + ", ".join(f"{k} {v:.0%}" for k, v in steps.items()))
    assert end is not None
    if end.failed or end.done != tier.selected:
        raise RuntimeError(f"quarry {output}: {end.done} done, {end.failed} failed of {tier.selected}")
    return seconds


def start_profile(stack: Stack, out: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy on each pool (its children included), raw stacks to `out/<pool>.txt`."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                str(BIN / "py-spy"),
                "record",
                "--subprocesses",
                "--format",
                "raw",
                "--rate",
                "100",
                "--pid",
                str(stack.processes[f"worker-{pool}"].pid),
                "--output",
                str(out / f"{pool}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pool in ("transform", "upload")
    ]


# where a sampled stack is, by the first of these (file:function) met from its leaf up
STEPS = (
    ("fetch", ("storage.py:ObjectStore.fetch", "storage.py:ObjectStore.read_many")),
    ("decode", ("images.py:decode", "images.py:imdecode")),
    ("encode", ("images.py:encode",)),
    ("render", ("augment/",)),
    ("PUT", ("storage.py:ObjectStore.put",)),
    ("ledger", ("common/ledger.py", "common/db.py", "common/datasets.py", "common/liveness.py", "psycopg")),
    ("message", ("kombu", "base.py:StageTask.hand_off", "json", "base64", "from_message", "to_message")),
)


# leaf frames of a thread waiting for work, which py-spy does not always see as idle
WAITING = (
    "thread.py:_worker",
    "threading.py:Condition.wait",
    "eventio.py:_epoll.poll",
    "billiard/connection.py",
)


def located(frame: str) -> str:
    """`file:function` of a py-spy frame `function (file:line)`."""
    function, _, where = frame.partition(" (")
    return f"{where.rsplit(':', 1)[0]}:{function}"


def step_of(stack: str) -> str:
    """The step of one py-spy stack (`function (file:line);...`, root first)."""
    for frame in reversed(stack.split(";")):
        for step, needles in STEPS:
            if any(needle in located(frame) for needle in needles):
                return step
    return "other (Celery, task bookkeeping)"


def profile_shares(folder: Path) -> dict[str, dict[str, float]]:
    """Per pool, the share of its busy samples (py-spy leaves idle threads out) in each step."""
    shares: dict[str, dict[str, float]] = {}
    for path in sorted(folder.glob("*.txt")):
        counts: dict[str, int] = {}
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if any(needle in located(stack.rsplit(";", 1)[-1]) for needle in WAITING):
                continue
            counts[step_of(stack)] = counts.get(step_of(stack), 0) + int(count)
        total = sum(counts.values()) or 1
        shares[path.stem] = {step: n / total for step, n in sorted(counts.items(), key=lambda kv: -kv[1])}
    return shares


def stop_profile(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        spy.wait(60)


def start_quarry(root: Path, endpoint: str) -> Stack:
    name = f"quarry_peers_{uuid.uuid4().hex[:8]}"
    env = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{name}",
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "RAW_BUCKET": RAW,
        "OUTPUT_BUCKET": OUT,
        "QUARRY_ENV_FILE": "",
    }
    stack = Stack(env, root / "stack")
    ensure_database(env["DATABASE_URL"])
    quarry(stack, "init")
    stack.start_redis()
    for queue, (pool, concurrency) in POOLS.items():
        stack.start_pool(queue, pool=pool, concurrency=concurrency)
    stack.start_dispatcher()
    return stack


def quarry(stack: Stack, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "producer"), *args], env={**os.environ, **stack.env}, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"producer {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


def drop_database(stack: Stack) -> None:
    name = stack.env["DATABASE_URL"].rsplit("/", 1)[1]
    with connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def versions() -> str:
    gateway = subprocess.run([s3_gateway.juicefs_binary(), "version"], capture_output=True, text=True).stdout
    server = f"S3: {gateway.strip()} gateway (SQLite metadata, local data folder)"
    if not PEERS_PYTHON.exists():
        return server
    peers = subprocess.run(
        [str(PEERS_PYTHON), "-c", "import daft, ray; print(daft.__version__, ray.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return f"Daft {peers[0]}, Ray {peers[1]}, {server}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=default_dataset_path())
    parser.add_argument("--tiers", default="sample,repeated,photographs")
    parser.add_argument("--systems", default="daft,ray,files,webdataset")
    parser.add_argument(
        "--repeats", type=int, default=10, help="the `repeated` tier: the sample this many times"
    )
    parser.add_argument("--photographs", type=int, default=2000, help="1,024-px photographs in that tier")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the pools during Quarry's files run into this folder"
    )
    args = parser.parse_args()
    tiers = {
        "sample": Tier("sample", sample_images(args.dataset, 1), 0),
        "repeated": Tier("repeated", sample_images(args.dataset, args.repeats), 0),
        "photographs": Tier("photographs", photograph_images(args.photographs), 0),
    }
    systems = args.systems.split(",")
    if {"daft", "ray"} & set(systems) and not PEERS_PYTHON.exists():
        sys.exit(f"no {PEERS_PYTHON}: `make .venv-peers` installs Daft and Ray Data there")
    root = Path(tempfile.mkdtemp(prefix="quarry-peers-"))
    server, endpoint = s3_gateway.start(root / "s3", free_port(), KEY, SECRET)
    s3 = s3_client(endpoint)
    for bucket in (RAW, OUT):
        s3.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    stack = start_quarry(root, endpoint)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores (shared by the S3 server, PostgreSQL,"
        f" Redis and the system under test), Python {platform.python_version()}; {versions()}",
        flush=True,
    )
    try:
        for name in args.tiers.split(","):
            tier = tiers[name]
            manifest = store_tier(tier, s3, server.pid)
            quarry(
                stack,
                "ingest",
                manifest,
                "--dataset",
                f"peers_{name}",
                "--id-column",
                "id",
                "--image-column",
                "uri",
            )
            print(
                f"\n{name}: {tier.count} images stored, {tier.selected} selected; the server's CPU per GET"
                f" {tier.get_ms:.2f} ms, per PUT {tier.put_ms:.2f} ms: bound {tier.bound:.0f} img/s",
                flush=True,
            )
            for system in systems:
                if system in ("daft", "ray"):
                    run = partial(run_peer, system, tier, manifest, endpoint)
                else:
                    profile = args.profile / name if args.profile and system == "files" else None
                    run = partial(run_quarry, stack, system, tier, profile)
                measure(system, tier, run, server.pid)
            costs = step_costs(tier, tier.ids[:STEP_IMAGES], stack.env)
            print("  steps, CPU ms/img: " + ", ".join(f"{step} {ms:.3f}" for step, ms in costs.items()))
            report(tier)
    finally:
        stack.stop_all()
        drop_database(stack)
        server.terminate()
        server.wait(30)
        print(f"logs: {root}", file=sys.stderr)


def measure(system: str, tier: Tier, run: Callable[[], float], server: int) -> None:
    """Run one system on a tier; print its rate, the server's CPU per image, the share of the
    bound, and every part's CPU per image (processes summed by `process_label`)."""
    before, before_all = server_cpu(server), cpu_by_label()
    seconds = run()
    rate, server_ms = tier.selected / seconds, (server_cpu(server) - before) * 1000 / tier.selected
    tier.rates[system] = (rate, server_ms)
    after = cpu_by_label()
    spent = {label: after[label] - before_all.get(label, 0.0) for label in after}
    parts = sorted(((v, k) for k, v in spent.items() if v > 0.05), reverse=True)
    print(
        f"  {system:<11} {seconds:7.1f} s {rate:7.1f} img/s  server CPU {server_ms:.2f} ms/img"
        f"  {rate / tier.bound:.0%} of the bound\n    CPU ms/img: "
        + ", ".join(f"{label} {used * 1000 / tier.selected:.2f}" for used, label in parts),
        flush=True,
    )


def report(tier: Tier) -> None:
    peers = {s: r for s, (r, _) in tier.rates.items() if s in ("daft", "ray")}
    if not peers:
        return
    best = max(peers, key=peers.__getitem__)
    for system in ("files", "webdataset"):
        if system in tier.rates:
            print(f"  {system} / {best} = {tier.rates[system][0] / peers[best]:.2f}x")


if __name__ == "__main__":
    main()
