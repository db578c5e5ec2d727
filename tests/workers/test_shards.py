"""WebDataset output end to end: real pools write shards and manifests; `webdataset` reads them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from common.config import Settings
from common.storage import ObjectStore
from tests.conftest import WITH_IMAGES, run_cli, run_job
from tests.stack import RequestLog

pytestmark = pytest.mark.usefixtures("workers")
SPEC = "hflip(p=0.5) | rotate(limit=15) | resize(64, 64)"
MISSING_ID = 999_999_999  # selected, but no catalog row and no image: must fail alone


def shard_files(store: ObjectStore, bucket: str, job_id: str) -> dict[str, bytes]:
    prefix = f"{job_id}/shards/"
    return {key[len(prefix) :]: store.get(bucket, key) for key in store.list_keys(bucket, prefix)}


def run_webdataset_job(env: dict[str, str], query: str, *args: str) -> dict[str, int | str]:
    _, summary = run_job(env, "--query", query, "--output", "webdataset", "--augment", SPEC, *args)
    return summary


# webdataset 1.0 leaves its shard files for the garbage collector to close
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_shards_hold_every_item_and_match_their_manifest(
    ingested: dict[str, str], store: ObjectStore, settings: Settings, tmp_path: Path, db: psycopg.Connection
) -> None:
    query = f"{WITH_IMAGES} AND s.master_category = 'Footwear' UNION ALL SELECT {MISSING_ID}"
    selected = {row[0] for row in db.execute(query)}
    summary = run_webdataset_job(
        ingested, query, "--shard-size", "16", "--variants", "2", "--model", "default"
    )
    job_id = str(summary["job_id"])
    assert summary["state"] == "finished"
    assert (summary["total"], summary["done"], summary["failed"]) == (
        2 * len(selected),
        2 * len(selected) - 2,
        2,
    )

    files = shard_files(store, settings.output_bucket, job_id)
    tars = sorted(name for name in files if name.endswith(".tar"))
    shards = -(-len(selected) // 16)
    assert tars == [f"{job_id}-{i:06d}.tar" for i in range(shards)]
    assert not any(name.startswith("_staging/") for name in files)  # inference removed them
    for name in tars:  # each shard has its stats and parquet manifest beside it
        assert f"{name[:-4]}_stats.json" in files and f"{name[:-4]}.parquet" in files
        (tmp_path / name).write_bytes(files[name])

    manifest = {
        (row["image_id"], row["variant"]): row
        for name in tars
        for row in pq.read_table(io.BytesIO(files[f"{name[:-4]}.parquet"])).to_pylist()
    }
    assert set(manifest) == {(i, v) for i in selected for v in range(2)}
    stats = [json.loads(files[f"{name[:-4]}_stats.json"]) for name in tars]
    assert sum(s["items"] for s in stats) == len(manifest) and sum(s["failed"] for s in stats) == 2
    assert [s["failures_by_error"] for s in stats if s["failed"]] == [{"transform: no image": 2}]

    seen, failed = set(), set()  # read the shards as a training loader would
    for sample in list(wds.WebDataset([str(tmp_path / name) for name in tars], shardshuffle=False)):
        record = json.loads(sample["json"])
        image_id, variant = int(record["id"]), int(record["variant"])
        row = manifest[(image_id, variant)]
        assert sample["__key__"] == f"{image_id}-{variant}"
        if row["status"] == "failed":  # a JSON record with the error, no image
            assert "jpg" not in sample and record["error"] == row["error"] == "transform: no image"
            assert record["catalog"] is None
            failed.add((image_id, variant))
            continue
        assert row["member"] == f"{image_id}-{variant}.jpg" and sample["jpg"][:2] == b"\xff\xd8"
        assert record["catalog"]["master_category"] == "Footwear"
        assert record["label"] == row["label"] and len(record["top_k"]) == 5
        seen.add((image_id, variant))
    assert failed == {(MISSING_ID, 0), (MISSING_ID, 1)}
    assert seen | failed == set(manifest)

    rows = [json.loads(line) for line in run_cli("results", job_id, env=ingested).stdout.splitlines()]
    done = {(r["image_id"], r["variant"]): r for r in rows if r["status"] == "done"}
    for key, row in done.items():
        assert row["label"] == manifest[key]["label"]
        assert row["uri"].endswith(f".tar#{key[0]}-{key[1]}.jpg")

    out = tmp_path / "results.parquet"
    run_cli("results", job_id, "--format", "parquet", "--out", str(out), env=ingested)
    assert pq.read_table(out).num_rows == len(rows) == 2 * len(selected)


def test_a_rerun_writes_byte_identical_shards_and_raw_inference_reads_each_raw_once(
    ingested: dict[str, str], store: ObjectStore, settings: Settings, s3_requests: RequestLog
) -> None:
    """Two jobs with the same spec and seed write the same tar bytes (the job id is the only
    difference in the records, so it is masked); with --infer-on raw the staging shard carries
    the raws, so inference fetches nothing but the shard: the raw bucket gets the same GETs as
    for the job without a model (counted at the S3 server)."""
    query = f"{WITH_IMAGES} AND s.master_category = 'Accessories'"

    def raw_gets() -> int:
        prefix = f"/{settings.raw_bucket}/"
        return sum(method == "GET" and path.startswith(prefix) for method, path in s3_requests.requests())

    digests = []
    for _ in range(2):
        s3_requests.mark()
        summary = run_webdataset_job(ingested, query, "--shard-size", "25", "--seed", "3")
        files = shard_files(store, settings.output_bucket, str(summary["job_id"]))
        digests.append(
            [
                files[n].replace(str(summary["job_id"]).encode(), b"J" * 36)
                for n in sorted(files)
                if n.endswith(".tar")
            ]
        )
    assert digests[0] == digests[1] and digests[0]

    without_model = raw_gets()
    s3_requests.mark()
    summary = run_webdataset_job(
        ingested, query, "--shard-size", "25", "--seed", "3", "--model", "default", "--infer-on", "raw"
    )
    assert summary["failed"] == 0 and summary["done"] == summary["total"]
    assert without_model > 0 and raw_gets() == without_model
