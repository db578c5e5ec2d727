"""Real photographs at three sizes (256, 1,024 and 3,000 pixels on the long side; bench/photographs.py),
the same pipeline as bench/end_to_end.py (`hflip(p=0.5) | rotate(limit=15) | resize(224, 224)` +
the default model), in one run on one real S3 server on loopback (tests/stack.py start_s3, the
JuiceFS gateway):

1. the transform stage on one core with the raw bytes in memory (render + shard tar), decoding in
   full (`--exact-decode`) and no larger than needed (the default), one pass each in turn, the
   best of STAGE_ROUNDS passes each (alternating single passes keeps the machine's drift out of
   the ratio);
   the PSNR of the reduced-decode outputs against the full-decode ones, on the rendered pixels
   (PNG output) and on the JPEG files a job writes (quality 90);
2. end to end, after a warm-up job: the plain loop (bench/end_to_end.py: one image at a time,
   batch-1 model) over the first LOOP_IMAGES, Quarry with --exact-decode and Quarry by default
   over all of them, each with webdataset output and default settings.

Run: python -m bench.sizes [--counts 256=2000 1024=3000 3000=250]
Needs the bench extra (`.venv/bin/pip install -e '.[bench]'`: scikit-image's photographs).
Uses the tests' PostgreSQL (tests/postgres.py: the machine's where it offers pgvector, which the
model's embeddings need, else an embedded one; a scratch database, dropped after) and a private redis-server.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import psycopg

from bench.end_to_end import OPS, plain_loop, quarry_run, render_in_memory, s3_client, transform_stage_rate
from bench.photographs import counts_by_side, jpeg_photographs
from bench.scratch import scratch_database
from common.augment import parse_spec
from common.augment.sizing import spec_floor
from common.config import Settings
from common.datasets import lookup_locations
from common.jobspec import JobSpec
from tests.postgres import base_url
from tests.stack import BIN, Stack, start_s3

COUNTS = {256: 6000, 1024: 6000, 3000: 400}  # long side -> photographs, the Quarry jobs' selection
STAGE_IMAGES = {256: 2000, 1024: 500, 3000: 100}  # of them, rendered in memory by the stage figures
LOOP_IMAGES = {256: 600, 1024: 600, 3000: 60}  # of them, run through the plain loop (its cost per
# image does not change along the way; 6,000 images at 1,024 pixels are 6 shards of the default
# 1,000, so that both transform processes are busy for most of the job, as in any job of size)
PSNR_IMAGES = 40  # photographs per size whose outputs are compared
STAGE_SHARD = 1000  # the default shard size
STAGE_ROUNDS = 8  # passes of each decode, alternating


def prepare(
    env: dict[str, str], root: Path, long_side: int, count: int
) -> tuple[str, list[int], dict[int, bytes]]:
    """Write the photographs as a folder, ingest it as dataset `photos_{long_side}`, and put each
    as an object of its own for the plain loop; (dataset, ids, raw bytes by id)."""
    folder = root / f"photos_{long_side}"
    folder.mkdir()
    raws = {}
    for image_id, data in enumerate(jpeg_photographs(long_side, count), start=1):
        (folder / f"{image_id}.jpg").write_bytes(data)
        raws[image_id] = data
    dataset = f"photos_{long_side}"
    subprocess.run(
        [str(BIN / "producer"), "ingest", str(folder), "--dataset", dataset],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    client = s3_client(env)
    for image_id in sorted(raws)[: LOOP_IMAGES.get(long_side, count)]:
        client.put_object(
            Bucket=env["RAW_BUCKET"], Key=f"objects/{long_side}/{image_id}.jpg", Body=raws[image_id]
        )
    return dataset, sorted(raws), raws


def psnr(
    database_url: str, dataset: str, ids: list[int], raws: dict[int, bytes]
) -> dict[str, tuple[float, float]]:
    """(mean, min) PSNR of reduced-decode outputs against full-decode ones: rendered pixels
    (PNG) and JPEG files (quality 90)."""
    settings = Settings()
    stages = parse_spec(OPS).stages
    with psycopg.connect(database_url) as db:
        index = lookup_locations(db, dataset, ids)
    held = {index[i].source: (raws[i], "") for i in ids}
    figures = {}
    for image_format in ("png", "jpeg"):

        def render(exact: bool, image_format: str = image_format) -> list[np.ndarray]:
            spec = JobSpec(
                job_id="psnr",
                augment=stages,
                image_format=image_format,
                decode_floor=spec_floor(stages, exact),
            )
            return [
                cv2.imdecode(np.frombuffer(o.data, np.uint8), cv2.IMREAD_COLOR)
                for o in render_in_memory(spec, ids, index, held, settings).outputs
            ]

        values = [min(cv2.PSNR(r, f), 99.0) for r, f in zip(render(False), render(True), strict=True)]
        figures["pixels" if image_format == "png" else "files"] = (
            float(np.mean(values)),
            float(np.min(values)),
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", nargs="*", default=[f"{k}={v}" for k, v in COUNTS.items()])
    args = parser.parse_args()
    counts = counts_by_side(args.counts)
    root = Path(tempfile.mkdtemp(prefix="quarry-sizes-"))
    s3 = start_s3(root)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()};"
        f" ops {OPS}; model default; webdataset output; default settings; S3: {s3.describe()}"
    )
    try:
        with scratch_database("quarry_sizes", base_url()) as database_url:
            env = {
                "DATABASE_URL": database_url,
                **s3.env(),
                "RAW_BUCKET": "bench-raw",
                "OUTPUT_BUCKET": "bench-out",
            }
            prepared = {size: prepare(env, root, size, count) for size, count in counts.items()}
            cv2.setNumThreads(1)  # one core: OpenCV would spread resize and warpAffine over both
            print(
                f"\n1. transform stage, one core, raws in memory (best of {STAGE_ROUNDS} passes,"
                " the two decodes in turn):"
            )
            for size, (dataset, all_ids, raws) in prepared.items():
                ids = all_ids[: STAGE_IMAGES.get(size, len(all_ids))]
                rates: dict[bool, float] = {True: 0.0, False: 0.0}
                for _ in range(STAGE_ROUNDS):
                    for exact in (True, False):
                        rate = transform_stage_rate(
                            database_url,
                            ids,
                            raws,
                            STAGE_SHARD,
                            dataset=dataset,
                            exact_decode=exact,
                            repeats=1,
                        )
                        rates[exact] = max(rates[exact], rate)
                full, reduced = rates[True], rates[False]
                quality = psnr(database_url, dataset, ids[:PSNR_IMAGES], raws)
                mean_bytes = sum(map(len, raws.values())) / len(raws)
                print(
                    f"  {size:>4} px ({len(ids)} JPEGs, {mean_bytes / 1024:7.1f} KiB each):"
                    f" full decode {full:7.1f} img/s, reduced {reduced:7.1f} img/s = {reduced / full:4.2f}x;"
                    f" PSNR pixels {quality['pixels'][0]:4.1f} dB (min {quality['pixels'][1]:4.1f}),"
                    f" files {quality['files'][0]:4.1f} dB (min {quality['files'][1]:4.1f})",
                    flush=True,
                )
            cv2.setNumThreads(0)
            print("\n2. end to end (one run, same S3 server):")
            stack = Stack(env, root / "stack")
            stack.start_redis()
            stack.start_pools()
            stack.start_dispatcher()
            log = s3.requests()
            try:
                warm_up = next(iter(prepared.values()))[0]  # model loaded, processes started
                quarry_run(stack, log, "--dataset", warm_up, query=f"SELECT id FROM {warm_up} WHERE id <= 20")
                for size, (dataset, ids, _) in prepared.items():
                    started = time.monotonic()
                    loop_ids = ids[: LOOP_IMAGES.get(size, len(ids))]
                    keys = {image_id: f"objects/{size}/{image_id}.jpg" for image_id in loop_ids}
                    loop_rate = plain_loop(env, keys) / (time.monotonic() - started)
                    rates = {}
                    for label, extra in (("full decode", ["--exact-decode"]), ("reduced", [])):
                        seconds, outputs, _ = quarry_run(
                            stack,
                            log,
                            "--dataset",
                            dataset,
                            "--output",
                            "webdataset",
                            *extra,
                            query=f"SELECT id FROM {dataset}",
                        )
                        rates[label] = outputs / seconds
                    full, reduced = rates["full decode"], rates["reduced"]
                    print(
                        f"  {size:>4} px: plain loop {loop_rate:6.1f} img/s over {len(loop_ids)};"
                        f" Quarry jobs of {len(ids)}:"
                        f" Quarry full decode {full:6.1f} img/s ({full / loop_rate:4.1f}x loop);"
                        f" Quarry {reduced:6.1f} img/s ({reduced / loop_rate:4.1f}x loop,"
                        f" {reduced / full:4.2f}x full decode)",
                        flush=True,
                    )
            finally:
                stack.stop_all()
    finally:
        s3.stop()
        print(f"logs: {root}")


if __name__ == "__main__":
    main()
