"""`drop-dataset` deletes exactly what Quarry wrote for the dataset (the shard and staged keys its
records name), never by prefix: a dataset registered where it is keeps every source object, a
packed one loses exactly its shards (an object someone else put under its prefix stays), and a
shard another dataset still references is kept with its record."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import psycopg
import pytest

from common.storage import ObjectStore
from tests.conftest import SAMPLE, run_cli
from tests.stack import Stack

pytestmark = pytest.mark.usefixtures("own_datasets")


def sample_folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir(parents=True)
    for path in sorted((SAMPLE / "images").glob("*.jpg"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def keys(store: ObjectStore, bucket: str, prefix: str = "") -> list[str]:
    return sorted(store.list_keys(bucket, prefix))


def test_a_dataset_registered_where_it_is_keeps_every_source_object(
    workers: Stack, test_env: dict[str, str], store: ObjectStore, tmp_path: Path, db: psycopg.Connection
) -> None:
    bucket = f"theirs-{uuid.uuid4().hex[:6]}"
    store.ensure_bucket(bucket)
    images = sorted((SAMPLE / "images").glob("*.jpg"))[:4]
    for path in images:
        store.put(bucket, f"photos/{path.name}", path.read_bytes(), content_type="image/jpeg", metadata={})
    manifest = "id,uri\n" + "".join(f"{i},s3://{bucket}/photos/{p.name}\n" for i, p in enumerate(images, 1))
    store.put(bucket, "photos.csv", manifest.encode(), content_type="text/csv", metadata={})
    name = f"inplace_{uuid.uuid4().hex[:6]}"
    arguments = ["--dataset", name, "--id-column", "id", "--image-column", "uri"]
    run_cli("ingest", f"s3://{bucket}/photos.csv", *arguments, env=test_env)
    before = keys(store, bucket)
    assert len(before) == 5

    dropped = run_cli("drop-dataset", name, env=test_env)
    assert dropped.stdout.strip() == f"dataset {name} dropped (0 objects Quarry wrote for it deleted)"
    assert keys(store, bucket) == before


def test_a_packed_dataset_loses_exactly_its_shards_and_a_shared_shard_is_kept(
    test_env: dict[str, str], store: ObjectStore, tmp_path: Path, db: psycopg.Connection
) -> None:
    raw = test_env["RAW_BUCKET"]
    name = f"packed_{uuid.uuid4().hex[:6]}"
    run_cli("ingest", str(sample_folder(tmp_path, 5)), "--dataset", name, env=test_env)
    (shard,) = keys(store, raw, f"packed/{name}/")
    stranger = f"packed/{name}/not-quarrys.txt"  # under the prefix, written by someone else
    store.put(raw, stranger, b"keep me", content_type="text/plain", metadata={})

    # another dataset whose row points at the same shard (two datasets sharing one shard)
    sharer = f"sharer_{uuid.uuid4().hex[:6]}"
    db.execute(f"CREATE TABLE {sharer} (id bigint PRIMARY KEY)")
    db.execute(f"INSERT INTO {sharer} VALUES (1)")
    db.execute("INSERT INTO datasets (name, id_column, format) VALUES (%s, 'id', 'folder')", (sharer,))
    db.execute(
        "INSERT INTO locations (dataset, id, shard, byte_offset, byte_length)"
        " SELECT (SELECT id FROM datasets WHERE name = %s), 1, l.shard, l.byte_offset, l.byte_length"
        " FROM locations l JOIN datasets d ON d.id = l.dataset WHERE d.name = %s LIMIT 1",
        (sharer, name),
    )
    kept = run_cli("drop-dataset", name, env=test_env)
    assert kept.stdout.strip() == f"dataset {name} dropped (0 objects Quarry wrote for it deleted)"
    assert keys(store, raw, f"packed/{name}/") == sorted([shard, stranger])
    assert db.execute("SELECT count(*) FROM shards WHERE uri = %s", (f"s3://{raw}/{shard}",)).fetchone() == (
        1,
    )

    again = f"packed_{uuid.uuid4().hex[:6]}"
    run_cli("ingest", str(sample_folder(tmp_path / "again", 3)), "--dataset", again, env=test_env)
    assert len(keys(store, raw, f"packed/{again}/")) == 1
    dropped = run_cli("drop-dataset", again, env=test_env)
    assert dropped.stdout.strip() == f"dataset {again} dropped (1 objects Quarry wrote for it deleted)"
    assert keys(store, raw, f"packed/{again}/") == []
    assert keys(store, raw, f"packed/{name}/") == sorted([shard, stranger])  # another's, untouched
