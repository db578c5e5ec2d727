"""Real photographs at 3,000 pixels through a real transform worker: over a chunk of 1,000 of
them its peak memory stays under a bound (raw bytes stream through in groups of
TRANSFORM_BYTES_IN_FLIGHT, one image decoded at a time, and no larger than needed), and a
decompression bomb in the same chunk fails alone with one line."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import psycopg
import pytest

from common.config import Settings
from common.db import connect, ensure_database
from common.storage import ObjectStore
from common.tarball import members
from tests.conftest import run_cli
from tests.photographs import bomb, jpeg, mosaic, with_comment
from tests.stack import Stack, start_moto, wait_until

pytestmark = pytest.mark.slow
PHOTOS = 1000
RSS_BOUND_MIB = 400  # docs/operations.md, "Memory of a transform process"
PIPELINE = "hflip | rotate(limit=15) | resize(224, 224)"
BOMB_ID = PHOTOS + 1


@pytest.fixture(scope="module")
def photo_env(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A database and an S3 server of their own (a gigabyte of photographs stays out of the
    session's), with 1,000 photographs of 3,000 x 2,000 and one bomb registered from a manifest."""
    name = f"quarry_photos_{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("photos")
    s3, endpoint = start_moto(root / "moto.log")
    env = {
        **test_env,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{name}",
        "S3_ENDPOINT_URL": endpoint,
    }
    try:
        ensure_database(env["DATABASE_URL"])
        store = ObjectStore(Settings(database_url=env["DATABASE_URL"], s3_endpoint_url=endpoint))
        store.ensure_bucket("photos")
        store.ensure_bucket(env["RAW_BUCKET"])
        store.ensure_bucket(env["OUTPUT_BUCKET"])
        photographs = [jpeg(mosaic(3000, 2000, seed), 85) for seed in range(4)]
        objects = {i: with_comment(photographs[i % 4], f"photo {i}") for i in range(1, PHOTOS + 1)}
        objects[BOMB_ID] = bomb()
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
        yield {**env, "PHOTO_MANIFEST": str(manifest)}
    finally:
        s3.terminate()
        s3.wait(10)
        with connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


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


def test_a_chunk_of_a_thousand_large_photographs_stays_in_bounded_memory_and_a_bomb_fails_alone(
    photo_stack: Stack,
) -> None:
    job_id, _ = run_job(photo_stack, "SELECT id FROM photos", "--shard-size", str(PHOTOS + 1))
    final = photo_stack.progress(job_id)
    peak = peak_rss_mib(photo_stack, "worker-transform")
    print(f"\n{PHOTOS} photographs of 3000x2000 in one chunk: transform peak RSS {peak:.0f} MiB")
    assert (final.state, final.done, final.failed) == ("finished", PHOTOS, 1)
    with psycopg.connect(photo_stack.env["DATABASE_URL"]) as conn:
        errors = conn.execute("SELECT image_id, error FROM job_items WHERE status = 'failed'").fetchall()
    assert errors == [
        (
            BOMB_ID,
            "transform: image too large: 30000×30000 (900,000,000 pixels; IMAGE_MAX_PIXELS is 100,000,000)",
        )
    ]
    assert peak < RSS_BOUND_MIB


def test_the_decode_floor_is_recorded_and_exact_decode_decodes_in_full(photo_stack: Stack) -> None:
    store = ObjectStore(
        Settings(
            database_url=photo_stack.env["DATABASE_URL"], s3_endpoint_url=photo_stack.env["S3_ENDPOINT_URL"]
        )
    )
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
