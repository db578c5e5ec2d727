"""End to end, side by side in one run on the same services: a plain Python loop a user would
write, Quarry with `--output files`, Quarry with `--output webdataset`. Same query, ops, model and
S3 server (a real one on loopback: tests/stack.py start_s3); S3 requests are counted by the
counting proxy in front of it.

Then the pipeline without the storage ceiling: the transform stage on one core with the raw bytes
in memory (S3 excluded), against the OpenCV limit (decode + the same ops + encode, one core),
each the best of 3 passes.

Run: python -m bench.end_to_end [--dataset ../shared/fashion-sample] [--shard-size 250]
Uses the tests' PostgreSQL (tests/postgres.py: the machine's where it offers pgvector, which the
model's embeddings need, else an embedded one; a scratch database, dropped after) and a private redis-server.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import cv2
import numpy as np
import psycopg

from common.augment import parse_spec
from common.augment.sizing import spec_floor
from common.config import Settings
from common.datasets import FASHION, lookup_catalog, lookup_locations
from common.db import connect, ensure_database
from common.jobspec import JobSpec
from common.model import Classifier
from common.paths import MODELS_DIR, default_dataset_path
from common.shards import shard_from_transform, write_tar
from common.transform import Fetched, ImageIndex, TransformResult, merged, transform_images
from tests.postgres import pg_url
from tests.stack import BIN, RequestLog, Stack, start_s3, wait_until

QUERY = (
    "SELECT s.id FROM styles s JOIN images i USING (id)"
    " WHERE s.master_category IN ('Footwear', 'Accessories') AND i.status = 'stored'"
)
OPS = "hflip(p=0.5) | rotate(limit=15) | resize(224, 224)"


def s3_client(env: dict[str, str]) -> Any:
    """A boto3 client on the bench's S3 server, as the plain loop's author would make one."""
    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def plain_loop(env: dict[str, str], raw_keys: dict[int, str]) -> int:
    """What a user would write: GET, decode, three OpenCV ops, encode, PUT, classify (batch 1),
    INSERT, one image at a time."""
    s3 = s3_client(env)
    model = Classifier(MODELS_DIR / "fashion-classifier.onnx")
    rng = np.random.default_rng(0)
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS loop_predictions (id bigint PRIMARY KEY, label text, score real)"
        )
        for image_id, raw_key in raw_keys.items():
            raw = s3.get_object(Bucket=env["RAW_BUCKET"], Key=raw_key)["Body"].read()
            image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
            if rng.random() < 0.5:
                image = cv2.flip(image, 1)
            height, width = image.shape[:2]
            turn = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-15, 15), 1.0)
            image = cv2.warpAffine(image, turn, (width, height), borderMode=cv2.BORDER_REFLECT_101)
            image = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
            encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
            s3.put_object(Bucket=env["OUTPUT_BUCKET"], Key=f"loop/{image_id}.jpg", Body=encoded)
            prediction = model.predict([image], 1)[0]
            db.execute(
                "INSERT INTO loop_predictions VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (image_id, prediction.label, prediction.score),
            )
    return len(raw_keys)


REPEATS = 3  # the in-memory rates are the best of this many passes (the first warms caches)


def best_rate(images: int, one_pass: Callable[[], object], repeats: int = REPEATS) -> float:
    """img/s of the fastest of `repeats` passes over `images` images."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - started)
    return images / min(seconds)


def opencv_limit(raws: list[bytes]) -> float:
    """img/s on one core: decode + hflip + rotate + resize + encode, nothing else."""
    return best_rate(len(raws), lambda: opencv_pass(raws))


def opencv_pass(raws: list[bytes]) -> None:
    for index, raw in enumerate(raws):
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        if index % 2:
            image = cv2.flip(image, 1)
        height, width = image.shape[:2]
        turn = cv2.getRotationMatrix2D((width / 2, height / 2), 7.0, 1.0)
        image = cv2.warpAffine(image, turn, (width, height), borderMode=cv2.BORDER_REFLECT_101)
        image = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])


def transform_stage_rate(
    database_url: str,
    ids: list[int],
    raws: dict[int, bytes],
    shard_size: int,
    *,
    dataset: str = FASHION,
    exact_decode: bool = False,
    repeats: int = REPEATS,
) -> float:
    """img/s on one core of Quarry's transform stage for webdataset output (render + shard tar),
    raw bytes from memory: the storage ceiling removed. The default settings' byte budget and
    pixel limit; JPEGs decoded no larger than needed unless `exact_decode`."""
    settings = Settings()
    stages = parse_spec(OPS).stages
    floor = spec_floor(stages, exact_decode)
    spec = JobSpec(job_id=str(uuid.uuid4()), augment=stages, output="webdataset", decode_floor=floor)
    with psycopg.connect(database_url) as db:
        index, catalog = lookup_locations(db, dataset, ids), lookup_catalog(db, dataset, ids)
    held = {index[i].source: (raws[i], "") for i in ids}

    def one_pass() -> None:
        for start in range(0, len(ids), shard_size):
            chunk = ids[start : start + shard_size]
            write_tar(
                shard_from_transform(spec, render_in_memory(spec, chunk, index, held, settings), catalog)
            )

    return best_rate(len(ids), one_pass, repeats)


def render_in_memory(
    spec: JobSpec, ids: list[int], index: ImageIndex, held: Fetched, settings: Settings
) -> TransformResult:
    """A chunk through the transform stage with its raw bytes already in memory (`held`)."""
    groups = transform_images(
        spec,
        ids,
        index,
        lambda sources: {s: held[s] for s in sources},
        bytes_in_flight=settings.transform_bytes_in_flight,
        max_pixels=settings.image_max_pixels,
    )
    return merged(groups)


def quarry_run(
    stack: Stack, log: RequestLog, *args: str, query: str = QUERY
) -> tuple[float, int, dict[str, int]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as db:
        db.execute("TRUNCATE model_outputs")  # each job runs the model, as the plain loop does
    log.mark()
    started = time.monotonic()
    job_id = stack.submit(query, "--augment", OPS, "--model", "default", *args)
    wait_until(lambda: stack.progress(job_id).ended, 1800, "the job", 0.05)  # the clock's resolution
    seconds = time.monotonic() - started
    end = stack.progress(job_id)
    assert end.failed == 0, f"{end.failed} items failed"
    return seconds, end.done, log.since_mark()


def report(
    name: str, seconds: float, outputs: int, requests: dict[str, int], baseline: float | None
) -> float:
    rate = outputs / seconds
    total = sum(requests.values())
    ratio = f"{rate / baseline:5.2f}x loop" if baseline else "  (baseline)"
    detail = ", ".join(f"{method} {count}" for method, count in sorted(requests.items()))
    print(
        f"{name:<22} {outputs:>6} outputs {seconds:7.1f} s {rate:7.1f} img/s {ratio}"
        f"   S3 requests/output {total / outputs:5.3f} ({detail})",
        flush=True,
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=default_dataset_path())
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="quarry-e2e-"))
    name = f"quarry_e2e_{uuid.uuid4().hex[:8]}"
    s3 = start_s3(root)
    env = {
        "DATABASE_URL": pg_url(name),
        **s3.env(),
        "DATASET_PATH": str(args.dataset),
        "RAW_BUCKET": "bench-raw",
        "OUTPUT_BUCKET": "bench-out",
    }
    stack = Stack(env, root / "stack")
    try:
        ensure_database(env["DATABASE_URL"])
        subprocess.run(
            [str(BIN / "producer"), "ingest"], env={**os.environ, **env}, check=True, capture_output=True
        )
        with psycopg.connect(env["DATABASE_URL"]) as db:
            ids = [row[0] for row in db.execute(QUERY + " ORDER BY 1")]
        client = s3_client(env)  # the plain loop's world: one object per image (set up, not timed)
        keys = {image_id: f"objects/{image_id}.jpg" for image_id in ids}
        for image_id, key in keys.items():
            body = (args.dataset / "images" / f"{image_id}.jpg").read_bytes()
            client.put_object(Bucket=env["RAW_BUCKET"], Key=key, Body=body)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()};"
            f" dataset {args.dataset}; {len(ids)} images; ops {OPS}; model default;"
            f" pools: transform 2 processes, upload 8 threads, inference 1; S3: {s3.describe()}"
        )
        log = s3.requests()
        log.mark()
        started = time.monotonic()
        loop_outputs = plain_loop(env, {image_id: keys[image_id] for image_id in ids})
        baseline = report("plain loop", time.monotonic() - started, loop_outputs, log.since_mark(), None)

        stack.start_redis()
        stack.start_pools()
        stack.start_dispatcher()
        seconds, outputs, requests = quarry_run(stack, log, "--output", "files")
        files_rate = report("quarry files", seconds, outputs, requests, baseline)
        seconds, outputs, requests = quarry_run(
            stack, log, "--output", "webdataset", "--shard-size", str(args.shard_size)
        )
        shards_rate = report(f"quarry webdataset/{args.shard_size}", seconds, outputs, requests, baseline)
        print(f"webdataset vs files: {shards_rate / files_rate:.2f}x")
        manifest = root / "per_object.csv"  # the same images, one object each, registered by reference
        manifest.write_text("id,uri\n" + "".join(f"{i},s3://bench-raw/{keys[i]}\n" for i in ids))
        registered = subprocess.run(
            [
                str(BIN / "producer"),
                "ingest",
                str(manifest),
                "--dataset",
                "per_object",
                "--id-column",
                "id",
                "--image-column",
                "uri",
            ],
            env={**os.environ, **stack.env},
            check=False,
            capture_output=True,
            text=True,
        )
        if registered.returncode != 0:
            raise SystemExit(f"the per-object manifest was refused: {registered.stderr.strip()}")
        seconds, outputs, requests = quarry_run(
            stack,
            log,
            "--dataset",
            "per_object",
            "--output",
            "webdataset",
            "--shard-size",
            str(args.shard_size),
            query="SELECT id FROM per_object",
        )
        objects_rate = report("  same, object per image", seconds, outputs, requests, baseline)
        print(f"packed shards vs one object per image: {shards_rate / objects_rate:.2f}x")
        stack.stop_all()

        raws = {
            key: client.get_object(Bucket=env["RAW_BUCKET"], Key=key)["Body"].read() for key in keys.values()
        }
        limit = opencv_limit(list(raws.values()))
        stage = transform_stage_rate(
            env["DATABASE_URL"], ids, {i: raws[keys[i]] for i in ids}, args.shard_size
        )
        print(
            f"without the storage ceiling, one core: OpenCV limit {limit:7.1f} img/s;"
            f" Quarry transform stage (render + shard) {stage:7.1f} img/s = {stage / limit:.0%} of the limit"
        )
    finally:
        stack.stop_all()
        s3.stop()
        with connect(pg_url("postgres"), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        print(f"logs: {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
