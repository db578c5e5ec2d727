"""Jobs over datasets of other shapes, read where they are: a Parquet manifest of objects in
another bucket, WebDataset shards written by img2dataset; sources changed or deleted after ingest.
Real pools, dispatcher, PostgreSQL and S3 server; requests counted from the server's log."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.storage import ObjectStore
from tests.conftest import SAMPLE, run_cli, run_job, upload_folder
from tests.stack import RequestLog, Stack

pytestmark = pytest.mark.usefixtures("own_datasets")


def put_images(store: ObjectStore, bucket: str, paths: list[Path]) -> list[str]:
    store.ensure_bucket(bucket)
    for path in paths:
        store.put(bucket, f"img/{path.name}", path.read_bytes(), content_type="image/jpeg", metadata={})
    return [f"s3://{bucket}/img/{path.name}" for path in paths]


def manifest_dataset(
    env: dict[str, str], store: ObjectStore, tmp_path: Path, count: int, log: RequestLog | None = None
) -> tuple[str, list[str]]:
    """A Parquet manifest (string keys, a caption, width/height, a score) of `count` images kept
    as objects in a bucket of their own, ingested through the CLI (`log` marked just before);
    (dataset, image URIs)."""
    name = f"catalog_{uuid.uuid4().hex[:6]}"
    uris = put_images(store, f"theirs-{uuid.uuid4().hex[:6]}", sorted(SAMPLE.glob("images/*.jpg"))[:count])
    table = pa.table(
        {
            "sample": [f"s{i:04d}" for i in range(count)],
            "location": uris,
            "caption": [f"product photo {i}" for i in range(count)],
            "width": pa.array([60] * count, pa.int16()),
            "height": pa.array([80] * count, pa.int16()),
            "score": [round(i / count, 4) for i in range(count)],
        }
    )
    pq.write_table(table, tmp_path / f"{name}.parquet")
    if log:
        log.mark()
    run_cli(
        "ingest",
        str(tmp_path / f"{name}.parquet"),
        "--dataset",
        name,
        "--id-column",
        "sample",
        "--image-column",
        "location",
        env=env,
    )
    return name, uris


def test_a_manifest_dataset_runs_by_reference_through_augment_model_and_shards(
    workers: Stack, test_env: dict[str, str], store: ObjectStore, s3_requests: RequestLog, tmp_path: Path
) -> None:
    name, uris = manifest_dataset(test_env, store, tmp_path, 40, s3_requests)
    ingest_requests = s3_requests.requests()
    puts = [path for method, path in ingest_requests if method in ("PUT", "POST")]
    assert len(puts) == 1 and "/_quarry/manifests/" in puts[0]  # the manifest file; 0 image bytes

    s3_requests.mark()
    code, summary = run_job(
        test_env,
        "--dataset",
        name,
        "--query",
        f"SELECT id FROM {name} WHERE score >= 0.5 AND caption LIKE 'product%'",
        "--augment",
        "hflip | resize(32, 32)",
        "--model",
        "default",
        "--output",
        "webdataset",
        "--shard-size",
        "8",
    )
    assert code == 0 and (summary["total"], summary["done"], summary["failed"]) == (20, 20, 0)
    requests = s3_requests.requests()
    raw_gets = [path for method, path in requests if method == "GET" and "/img/" in path]
    assert sorted(raw_gets) == sorted(uri[4:] for uri in uris[20:])  # one GET per selected image, no more
    job = summary["job_id"]
    written = [path for method, path in requests if method == "PUT" and f"/{job}/" in path]
    assert len([p for p in written if p.endswith(".tar") and "staging" not in p]) == 3  # 20 images, 8 a shard
    shards = [key for key in store.list_keys(test_env["OUTPUT_BUCKET"], f"{job}/") if key.endswith(".tar")]
    records = []
    for key in shards:
        with tarfile.open(fileobj=io.BytesIO(store.get(test_env["OUTPUT_BUCKET"], key))) as tar:
            records += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]  # type: ignore[arg-type]
    assert len(records) == 20 and all("label" in r for r in records)
    assert {r["catalog"]["sample"] for r in records} == {
        f"s{i:04d}" for i in range(20, 40)
    }  # its own columns


def test_img2dataset_shards_run_in_place_with_the_member_bytes(
    workers: Stack,
    test_env: dict[str, str],
    store: ObjectStore,
    db: psycopg.Connection,
    img2dataset_shards: Path,
    s3_requests: RequestLog,
) -> None:
    name, bucket = f"web_{uuid.uuid4().hex[:6]}", f"shards-{uuid.uuid4().hex[:6]}"
    upload_folder(store, img2dataset_shards, bucket, "laion")
    run_cli("ingest", f"s3://{bucket}/laion/", "--dataset", name, env=test_env)
    s3_requests.mark()
    query = f"SELECT id FROM {name} WHERE status = 'success' AND score < 0.5"
    selected = len(db.execute(query).fetchall())
    code, summary = run_job(test_env, "--dataset", name, "--query", query)
    assert code == 0 and summary["failed"] == 0 and summary["done"] == selected == 13  # scores 0.00-0.48
    ranged = [
        path for method, path in s3_requests.requests() if method == "GET" and path.startswith(f"/{bucket}/")
    ]
    holding = db.execute(
        f"SELECT count(DISTINCT l.shard) FROM locations l JOIN datasets d ON d.id = l.dataset AND d.name = %s"
        f" WHERE l.id IN ({query})",
        (name,),
    ).fetchone()[0]
    assert 1 <= holding < 13  # the 13 images sit in fewer shards than images
    assert len(ranged) == holding and all(path.endswith(".tar") for path in ranged)  # one read a shard
    keys = dict(db.execute(f"SELECT id, key FROM {name}").fetchall())
    images = {}
    for path in img2dataset_shards.glob("*.tar"):
        with tarfile.open(path) as tar:
            images |= {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}  # type: ignore[union-attr]
    rows = [
        json.loads(line) for line in run_cli("results", summary["job_id"], env=test_env).stdout.splitlines()
    ]
    assert len(rows) == 13
    for row in rows:
        out_bucket, out_key = row["uri"][5:].split("/", 1)
        assert store.get(out_bucket, out_key) == images[f"{keys[row['image_id']]}.jpg"]  # the member's bytes

    first_shard = (img2dataset_shards / "00000.tar").read_bytes()  # rewritten: same members, new ETag
    store.put(
        bucket, "laion/00000.tar", first_shard + bytes(512), content_type="application/x-tar", metadata={}
    )
    code, after = run_job(test_env, "--dataset", name, "--query", f"SELECT id FROM {name}")
    with tarfile.open(img2dataset_shards / "00000.tar") as tar:
        in_first = sum(name.endswith(".jpg") for name in tar.getnames())
    assert code == 1 and (after["failed"], after["done"]) == (in_first, 25 - in_first)
    errors = {
        r["error"]
        for r in map(json.loads, run_cli("results", after["job_id"], env=test_env).stdout.splitlines())
        if r["status"] == "failed"
    }
    assert errors == {f"transform: source changed since it was registered: s3://{bucket}/laion/00000.tar"}


def test_a_source_changed_or_deleted_after_ingest_fails_alone_with_its_cause(
    workers: Stack, test_env: dict[str, str], store: ObjectStore, tmp_path: Path
) -> None:
    name, uris = manifest_dataset(test_env, store, tmp_path, 10)
    code, first = run_job(test_env, "--dataset", name, "--query", f"SELECT id FROM {name}")
    assert code == 0 and first["done"] == 10  # read once: every object's ETag is pinned

    changed, deleted = uris[3], uris[7]
    bucket, key = changed[5:].split("/", 1)
    other = sorted(SAMPLE.glob("images/*.jpg"))[20].read_bytes()  # a decodable image, other bytes
    store.put(bucket, key, other, content_type="image/jpeg", metadata={})
    bucket, key = deleted[5:].split("/", 1)
    store.delete(bucket, key)

    code, second = run_job(test_env, "--dataset", name, "--query", f"SELECT id FROM {name}")
    assert code == 1 and (second["done"], second["failed"]) == (8, 2)
    rows = [
        json.loads(line) for line in run_cli("results", second["job_id"], env=test_env).stdout.splitlines()
    ]
    errors = sorted(row["error"] for row in rows if row["status"] == "failed")
    assert errors == [
        f"transform: source changed since it was registered: {changed}",
        f"transform: source vanished: {deleted}",
    ]
