"""Sources the operator allowed (SOURCE_BUCKETS): a manifest or prefix in another bucket, or a
manifest whose images are in one (OUTPUT_BUCKET, where other jobs' results are, by default), is
refused at ingest with one line and exit 2, before anything is read there or recorded; a source
outside them is never read by a job (the confused deputy)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from common.config import Settings
from common.errors import SourceRefused
from common.sources import Source
from common.storage import ObjectStore
from tests.conftest import SAMPLE, run_cli
from tests.stack import RequestLog


def ingest_manifest(
    tmp_path: Path, uris: list[str], name: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`producer ingest` of a local CSV manifest naming `uris`, as a user types it."""
    path = tmp_path / "photos.csv"
    path.write_text("id,uri\n" + "".join(f"{i},{uri}\n" for i, uri in enumerate(uris, start=1)))
    arguments = ["--dataset", name, "--id-column", "id", "--image-column", "uri"]
    return run_cli("ingest", str(path), *arguments, env=env, check=False)


def assert_refused(
    result: subprocess.CompletedProcess[str], db: psycopg.Connection, name: str, reason: str
) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], lines
    assert db.execute("SELECT count(*) FROM datasets WHERE name = %s", (name,)).fetchone() == (0,)
    assert db.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,)
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,), "an ingest job was recorded"


def test_a_manifest_of_images_in_the_output_bucket_is_refused_by_default(
    ingested: dict[str, str], db: psycopg.Connection, settings: Settings, store: ObjectStore, tmp_path: Path
) -> None:
    image = sorted((SAMPLE / "images").glob("*.jpg"))[0]
    store.put(
        settings.output_bucket, "other-job/1.jpg", image.read_bytes(), content_type="image/jpeg", metadata={}
    )
    name = f"stolen_{uuid.uuid4().hex[:6]}"
    result = ingest_manifest(tmp_path, [f"s3://{settings.output_bucket}/other-job/1.jpg"], name, ingested)
    assert_refused(result, db, name, f"bucket {settings.output_bucket} is not a source Quarry may read")


def test_a_manifest_or_prefix_in_a_bucket_not_allowed_is_refused_unread(
    ingested: dict[str, str],
    db: psycopg.Connection,
    store: ObjectStore,
    s3_requests: RequestLog,
    tmp_path: Path,
) -> None:
    allowed, other = f"allowed-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    for bucket in (allowed, other):
        store.ensure_bucket(bucket)
    store.put(other, "m/photos.csv", b"id,uri\n1,s3://x/1.jpg\n", content_type="text/csv", metadata={})
    env = {**ingested, "SOURCE_BUCKETS": allowed}
    s3_requests.mark()
    for source in (f"s3://{other}/m/photos.csv", f"s3://{other}/shards/"):
        name = f"elsewhere_{uuid.uuid4().hex[:6]}"
        args = ["--id-column", "id", "--image-column", "uri"] if source.endswith(".csv") else []
        result = run_cli("ingest", source, "--dataset", name, *args, env=env, check=False)
        assert_refused(
            result, db, name, f"bucket {other} is not a source Quarry may read (SOURCE_BUCKETS: {allowed})"
        )
    assert [path for _, path in s3_requests.requests() if other in path] == []  # not even listed
    name = f"pointing_{uuid.uuid4().hex[:6]}"
    result = ingest_manifest(tmp_path, [f"s3://{other}/1.jpg"], name, env)
    assert_refused(result, db, name, f"bucket {other} is not a source Quarry may read")


def test_a_source_outside_the_allowed_buckets_is_never_read(
    settings: Settings, s3_requests: RequestLog
) -> None:
    """The last wall, at fetch time, for a location registered before SOURCE_BUCKETS changed."""
    store = ObjectStore(settings.model_copy(update={"source_buckets": settings.raw_bucket}))
    source = Source(f"s3://{settings.output_bucket}/other-job/1.jpg")
    got = store.read_many([source])
    assert isinstance(got[source], SourceRefused)
    with pytest.raises(SourceRefused, match="SOURCE_BUCKETS"):
        store.read(source)
    assert s3_requests.requests() == []
