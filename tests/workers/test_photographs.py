"""Real photographs at 3,000 pixels through a real transform worker: over a chunk of 1,000 of
them its peak memory stays under a bound (raw bytes stream through in groups of
TRANSFORM_BYTES_IN_FLIGHT, one image decoded at a time, and no larger than needed), and the
bombs in the same chunk each fail alone with one line: a JPEG whose frame declares 30,000 x
30,000, the same with a stray byte before its frame, a TIFF and a BMP declaring as much, and an
object past IMAGE_MAX_BYTES; a PNG with alpha just under IMAGE_MAX_PIXELS is rendered within
the bound."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import psycopg
import pytest

from common.config import Settings
from common.storage import ObjectStore
from common.tarball import members
from tests.conftest import PrivateDatabase, run_cli
from tests.photographs import (
    bmp_bomb,
    bomb,
    jpeg,
    mosaic,
    png_with_alpha,
    tiff_bomb,
    with_comment,
    with_stray_byte,
)
from tests.stack import Stack, start_s3, wait_until

PHOTOS = 1000
RSS_BOUND_MIB = 500  # docs/operations.md, "Memory of a transform process"
PIPELINE = "hflip | rotate(limit=15) | resize(224, 224)"
MAX_PIXELS = 16_000_000  # the stack's IMAGE_MAX_PIXELS: a PNG just under it is 64 MB decoded (BGRA)
MAX_BYTES = 16 * 1024 * 1024  # the stack's IMAGE_MAX_BYTES
BOMB_ID, STRAY_ID, TIFF_ID, BMP_ID, HEAVY_ID, PNG_ID = range(PHOTOS + 1, PHOTOS + 7)
LIMIT = "IMAGE_MAX_PIXELS, checked by OpenCV; {size:,} bytes, undecoded"


def photo_store(env: dict[str, str]) -> ObjectStore:
    """The photographs' own S3 server, with its keys."""
    return ObjectStore(
        Settings(
            database_url=env["DATABASE_URL"],
            s3_endpoint_url=env["S3_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
    )


@pytest.fixture(scope="module")
def photo_env(
    private_database: PrivateDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """A database and an S3 server of their own (a gigabyte of photographs stays out of the
    session's), with 1,000 photographs of 3,000 x 2,000 and one bomb registered from a manifest."""
    root = tmp_path_factory.mktemp("photos")
    s3 = start_s3(root)
    settings = {
        **s3.env(),
        "IMAGE_MAX_PIXELS": str(MAX_PIXELS),
        "IMAGE_MAX_BYTES": str(MAX_BYTES),
    }
    cleanup = contextlib.ExitStack()
    try:
        env = cleanup.enter_context(private_database("photos", "bare", **settings))
        store = photo_store(env)
        store.ensure_bucket("photos")
        store.ensure_bucket(env["RAW_BUCKET"])
        store.ensure_bucket(env["OUTPUT_BUCKET"])
        photographs = [jpeg(mosaic(3000, 2000, seed), 85) for seed in range(4)]
        objects = {i: with_comment(photographs[i % 4], f"photo {i}") for i in range(1, PHOTOS + 1)}
        objects[BOMB_ID] = bomb()
        objects[STRAY_ID] = with_stray_byte(bomb())
        objects[TIFF_ID] = tiff_bomb()
        objects[BMP_ID] = bmp_bomb()
        objects[HEAVY_ID] = photographs[0] + bytes(MAX_BYTES)  # a JPEG, then zeros past the limit
        objects[PNG_ID] = png_with_alpha(4000, 3990)  # 15,960,000 pixels
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda item: store.put(
                        "photos", f"{item[0]}.jpg", item[1], content_type="image/jpeg", metadata={}
                    ),
                    objects.items(),
                )
            )
        manifest = root / "photos.csv"
        manifest.write_text("id,uri\n" + "".join(f"{i},s3://photos/{i}.jpg\n" for i in objects))
        sizes = json.dumps({i: len(data) for i, data in objects.items()})
        yield {**env, "PHOTO_MANIFEST": str(manifest), "SIZES": sizes}
    finally:
        cleanup.close()
        s3.stop()


@pytest.fixture(scope="module")
def photo_stack(photo_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A broker, one transform pool (its processes fresh: their peak memory is this module's)
    and a dispatcher on the photographs' database; the manifest ingested through them."""
    stack = Stack(photo_env, tmp_path_factory.mktemp("photo-stack"))
    try:
        stack.start_redis()
        stack.start_pool("transform")
        stack.start_dispatcher()
        manifest = photo_env["PHOTO_MANIFEST"]
        run_cli(
            "ingest",
            manifest,
            "--dataset",
            "photos",
            "--id-column",
            "id",
            "--image-column",
            "uri",
            env=stack.env,
        )
        yield stack
    finally:
        stack.stop_all()


def peak_rss_mib(stack: Stack, name: str) -> float:
    """The largest peak resident set (VmHWM) among a pool's worker processes."""
    children = psutil.Process(stack.processes[name].pid).children(recursive=True)
    peaks = []
    for child in children:
        status = Path(f"/proc/{child.pid}/status").read_text()
        peaks.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))))
    return max(peaks) / 1024


def run_job(stack: Stack, query: str, *args: str) -> tuple[str, str]:
    """Run a job with webdataset output to its end; (job id, what `producer run` said)."""
    result = run_cli(
        "run",
        "--dataset",
        "photos",
        "--query",
        query,
        "--augment",
        PIPELINE,
        "--output",
        "webdataset",
        *args,
        env=stack.env,
    )
    job_id = result.stdout.strip().splitlines()[-1]
    wait_until(lambda: stack.progress(job_id).ended, 600, "the job", interval=0.5)
    return job_id, result.stderr


def test_a_chunk_of_a_thousand_large_photographs_stays_in_bounded_memory_and_each_bomb_fails_alone(
    photo_stack: Stack,
) -> None:
    job_id, _ = run_job(photo_stack, "SELECT id FROM photos", "--shard-size", str(PHOTOS + 6))
    final = photo_stack.progress(job_id)
    peak = peak_rss_mib(photo_stack, "worker-transform")
    print(f"\n{PHOTOS} photographs of 3000x2000 and 6 others in one chunk: transform peak RSS {peak:.0f} MiB")
    with psycopg.connect(photo_stack.env["DATABASE_URL"]) as conn:
        failed = conn.execute("SELECT image_id, error FROM job_items WHERE status = 'failed'")
        errors = dict(failed.fetchall())
    sizes = {int(i): size for i, size in json.loads(photo_stack.env["SIZES"]).items()}
    declared = "image too large: 30000×30000 (900,000,000 pixels; IMAGE_MAX_PIXELS is 16,000,000)"
    assert errors == {
        BOMB_ID: f"transform: {declared}",
        STRAY_ID: f"transform: {declared}",
        TIFF_ID: f"transform: image too large: its header declares more than 16,000,000 pixels"
        f" ({LIMIT.format(size=sizes[TIFF_ID])})",
        BMP_ID: f"transform: image too large: its header declares more than 16,000,000 pixels"
        f" ({LIMIT.format(size=sizes[BMP_ID])})",
        HEAVY_ID: f"transform: image too large: s3://photos/{HEAVY_ID}.jpg is {sizes[HEAVY_ID]:,} bytes"
        f" (IMAGE_MAX_BYTES is {MAX_BYTES:,}; not read)",
    }
    assert (final.state, final.done, final.failed) == ("finished", PHOTOS + 1, 5)  # the PNG rendered
    assert peak < RSS_BOUND_MIB


def test_the_decode_floor_is_recorded_and_exact_decode_decodes_in_full(photo_stack: Stack) -> None:
    store = photo_store(photo_stack.env)
    shards = {}
    for label, extra in (("reduced", []), ("again", []), ("exact", ["--exact-decode"])):
        job_id, said = run_job(photo_stack, "SELECT id FROM photos WHERE id <= 6", *extra)
        spec = run_cli("status", job_id, "--json", env=photo_stack.env)
        with psycopg.connect(photo_stack.env["DATABASE_URL"]) as conn:
            (stored,) = conn.execute("SELECT spec FROM jobs WHERE id = %s", (job_id,)).fetchone()  # type: ignore[misc]
        if label == "exact":
            assert (stored["exact_decode"], stored["decode_floor"]) == (True, None)
            assert "images decoded in full (--exact-decode)" in said
        else:
            assert (stored["exact_decode"], stored["decode_floor"]) == (False, [336, 336])
            assert "JPEGs decoded at 1/2, 1/4 or 1/8 scale where that keeps at least 336x336" in said
        assert json.loads(spec.stdout)["done"] == 6
        (key,) = [
            k for k in store.list_keys(photo_stack.env["OUTPUT_BUCKET"], f"{job_id}/") if k.endswith(".tar")
        ]
        shards[label] = [
            data
            for name, data in members(store.get(photo_stack.env["OUTPUT_BUCKET"], key))
            if name.endswith(".jpg")
        ]
    assert len(shards["reduced"]) == 6
    assert shards["reduced"] == shards["again"]  # the same bytes every run
    assert shards["reduced"] != shards["exact"]  # a 3000x2000 JPEG decoded at 1/4, not in full
