"""Datasets of other shapes: manifests whose rows locate images where they are, WebDataset shards
registered as img2dataset wrote them; against PostgreSQL and the S3 server (no pools)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import Settings
from common.errors import UserError
from common.storage import ObjectStore
from quarry import Quarry
from tests.conftest import SAMPLE, run_cli, upload_folder
from tests.stack import RequestLog, Stack

pytestmark = pytest.mark.usefixtures("own_datasets")


def sample_images(count: int) -> list[Path]:
    return sorted(SAMPLE.glob("images/*.jpg"))[:count]


def put_images(store: ObjectStore, bucket: str, paths: list[Path]) -> list[str]:
    """The images as objects of their own in another bucket, as a user's dataset would be."""
    store.ensure_bucket(bucket)
    uris = []
    for path in paths:
        store.put(bucket, f"photos/{path.name}", path.read_bytes(), content_type="image/jpeg", metadata={})
        uris.append(f"s3://{bucket}/photos/{path.name}")
    return uris


@pytest.fixture
def quarry(db: psycopg.Connection, settings: Settings, workers: Stack) -> Quarry:
    """The API, with the pools and the dispatcher running (manifests and shards register there)."""
    return Quarry(settings)


def column_types(db: psycopg.Connection, table: str) -> dict[str, str]:
    rows = db.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s", (table,)
    ).fetchall()
    return dict(rows)


def test_a_parquet_manifest_is_registered_by_reference_with_its_own_typed_columns(
    quarry: Quarry, db: psycopg.Connection, store: ObjectStore, s3_requests: RequestLog, tmp_path: Path
) -> None:
    name = f"photos_{uuid.uuid4().hex[:6]}"
    bucket = f"elsewhere-{uuid.uuid4().hex[:6]}"
    uris = put_images(store, bucket, sample_images(12))
    keys = [f"img-{i:03d}" for i in range(len(uris))] + ["img-nourl", "img-http"]
    table = pa.table(
        {
            "key": keys,
            "url": [*uris, None, "http://example.org/a.jpg"],
            "caption": [f"a photo number {i}" for i in range(len(keys))],
            "width": pa.array([60] * len(keys), pa.int32()),
            "height": pa.array([80] * len(keys), pa.int32()),
            "score": [i / 10 for i in range(len(keys))],
        }
    )
    pq.write_table(table, tmp_path / "manifest.parquet")
    s3_requests.mark()

    summary = quarry.ingest(tmp_path / "manifest.parquet", dataset=name, id_column="key", image_column="url")

    assert (summary.rows, summary.images, summary.present, summary.missing) == (14, 14, 0, 0)
    puts = [path for method, path in s3_requests.requests() if method in ("PUT", "POST")]
    assert len(puts) == 1 and puts[0].endswith("/manifest.parquet")  # the manifest, for the pools
    assert "/_quarry/manifests/" in puts[0]  # and not one image byte
    assert column_types(db, name) == {
        "id": "bigint",
        "key": "text",
        "url": "text",
        "caption": "text",
        "width": "integer",
        "height": "integer",
        "score": "double precision",
    }
    selected = quarry.sql(
        f"SELECT id, key FROM {name} WHERE score >= 0.5 AND caption LIKE 'a photo%' ORDER BY id"
    )
    assert list(selected["key"]) == keys[5:]  # the query role reads the new table
    errors = dict(
        db.execute(
            f"SELECT c.key, l.error FROM {name} c JOIN locations l ON l.id = c.id"
            " JOIN datasets d ON d.id = l.dataset AND d.name = %s WHERE l.error IS NOT NULL",
            (name,),
        ).fetchall()
    )
    assert errors == {
        "img-nourl": "no image location (column url is empty)",
        "img-http": "not an s3://bucket/key URI: http://example.org/a.jpg",
    }

    again = quarry.ingest(tmp_path / "manifest.parquet", dataset=name, id_column="key", image_column="url")
    assert (again.units_present, again.rows, again.job_id) == (1, 0, None)  # nothing new: no job
    assert db.execute(f"SELECT count(*), max(id) FROM {name}").fetchone() == (14, 14)  # ids kept


def test_csv_and_jsonl_manifests_from_s3_infer_types_and_count_bad_lines(
    quarry: Quarry, db: psycopg.Connection, store: ObjectStore, settings: Settings
) -> None:
    name = f"items_{uuid.uuid4().hex[:6]}"
    bucket = f"manifests-{uuid.uuid4().hex[:6]}"
    uris = put_images(store, bucket, sample_images(4))
    csv_text = "item_id,uri,label,price\n" + "".join(
        f"{100 + i},{uri},label {i},{i}.5\n" for i, uri in enumerate(uris[:2])
    )
    csv_text += "999,too,many,fields,here\n"
    store.put(bucket, "manifest/part-0.csv", csv_text.encode(), content_type="text/csv", metadata={})
    lines = [json.dumps({"item_id": 102, "uri": uris[2], "label": "label 2", "price": 2.5}), "{not json"]
    lines.append(json.dumps({"item_id": 103, "uri": uris[3], "label": "label 3", "price": 3.5}))
    store.put(
        bucket, "manifest/part-1.jsonl", "\n".join(lines).encode(), content_type="text/plain", metadata={}
    )

    summary = quarry.ingest(f"s3://{bucket}/manifest/", dataset=name, id_column="item_id", image_column="uri")

    assert (summary.rows, summary.images, summary.rejected) == (4, 4, 2)
    assert any("part-0.csv:4" in problem and "5 fields" in problem for problem in summary.problems)
    assert any("part-1.jsonl:2" in problem and "not JSON" in problem for problem in summary.problems)
    assert (
        column_types(db, name)["item_id"] == "bigint"
        and column_types(db, name)["price"] == "double precision"
    )
    assert db.execute(f"SELECT array_agg(item_id ORDER BY item_id) FROM {name}").fetchone() == (
        [100, 101, 102, 103],
    )


def test_a_manifest_of_local_paths_packs_its_images_and_records_a_missing_one(
    quarry: Quarry, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Absolute paths, and paths relative to the manifest; a missing file fails its row alone."""
    name = f"local_{uuid.uuid4().hex[:6]}"
    images = sample_images(3)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "b.jpg").write_bytes(images[1].read_bytes())
    rows = [f"10,{images[0]},first", "11,photos/b.jpg,second", "12,photos/gone.jpg,third"]
    (tmp_path / "local.csv").write_text("sku,path,caption\n" + "\n".join(rows) + "\n")

    summary = quarry.ingest(tmp_path / "local.csv", dataset=name, id_column="sku", image_column="path")

    assert (summary.rows, summary.images, summary.bad, summary.job_id) == (3, 2, 1, None)
    located = db.execute(
        "SELECT l.id, l.shard IS NOT NULL, l.error FROM locations l JOIN datasets d ON d.id = l.dataset"
        " WHERE d.name = %s ORDER BY l.id",
        (name,),
    ).fetchall()
    assert located == [
        (10, True, None),
        (11, True, None),
        (12, False, f"no such file: {tmp_path / 'photos/gone.jpg'}"),
    ]
    again = quarry.ingest(tmp_path / "local.csv", dataset=name, id_column="sku", image_column="path")
    assert (again.images, again.present) == (0, 2)


def test_bad_manifests_are_refused_whole_with_one_line(
    quarry: Quarry, db: psycopg.Connection, tmp_path: Path
) -> None:
    name = f"bad_{uuid.uuid4().hex[:6]}"
    rows = "id,uri\n1,s3://b/1.jpg\n2,s3://b/2.jpg\n1,s3://b/1-again.jpg\n"
    (tmp_path / "dupes.csv").write_text(rows)
    refused = quarry.ingest(tmp_path / "dupes.csv", dataset=name, id_column="id", image_column="uri")
    assert refused.units_failed == 1 and len(refused.problems) == 1
    assert refused.problems[0].endswith("dupes.csv: duplicate id values in the manifest: 1 (2x)")
    assert db.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,)  # no empty dataset left
    assert db.execute("SELECT count(*) FROM datasets WHERE name = %s", (name,)).fetchone() == (0,)
    with pytest.raises(UserError, match=r"no column 'image_id' \(columns: id, uri\)"):
        quarry.ingest(tmp_path / "dupes.csv", dataset=name, id_column="image_id", image_column="uri")
    with pytest.raises(UserError, match="name the dataset with --dataset"):
        quarry.ingest(tmp_path / "dupes.csv", id_column="id", image_column="uri")
    with pytest.raises(UserError, match="one of Quarry's own tables"):
        quarry.ingest(tmp_path / "dupes.csv", dataset="jobs", id_column="id", image_column="uri")
    nowhere = "id,path\n1,/nowhere/a.jpg\n2,photos/b.jpg\n"  # neither s3:// URIs nor files here
    (tmp_path / "nowhere.csv").write_text(nowhere)
    with pytest.raises(
        UserError, match=r"column 'path' holds '/nowhere/a.jpg': neither an s3:// URI nor a file"
    ):
        quarry.ingest(tmp_path / "nowhere.csv", dataset=name, id_column="id", image_column="path")
    assert db.execute("SELECT count(*) FROM datasets WHERE name = %s", (name,)).fetchone() == (0,)
    (tmp_path / "floats.csv").write_text("id,uri\n1.5,s3://b/1.jpg\n")
    with pytest.raises(UserError, match="id column 'id' is double, not integers or strings"):
        quarry.ingest(tmp_path / "floats.csv", dataset=name, id_column="id", image_column="uri")
    with pytest.raises(UserError, match="not a PostgreSQL type name"):
        quarry.ingest(
            tmp_path / "floats.csv",
            dataset=name,
            id_column="id",
            image_column="uri",
            column_types={"uri": "text); DROP TABLE jobs; --"},
        )


def test_webdataset_shards_are_registered_where_they_are(
    quarry: Quarry,
    db: psycopg.Connection,
    store: ObjectStore,
    img2dataset_shards: Path,
    s3_requests: RequestLog,
) -> None:
    name = f"web_{uuid.uuid4().hex[:6]}"
    bucket = f"laion-{uuid.uuid4().hex[:6]}"
    upload_folder(store, img2dataset_shards, bucket, "shards")
    good = (img2dataset_shards / "00000.tar").read_bytes()
    store.put(
        bucket, "shards/00097.tar", good[: len(good) // 2], content_type="application/x-tar", metadata={}
    )
    store.put(bucket, "shards/00098.tar", gzip.compress(good), content_type="application/x-tar", metadata={})
    store.put(
        bucket, "shards/00099.tar.gz", gzip.compress(good), content_type="application/gzip", metadata={}
    )
    s3_requests.mark()

    summary = quarry.ingest(f"s3://{bucket}/shards/", dataset=name)

    assert (summary.shards, summary.images, summary.missing) == (3, 25, 0)
    assert summary.rows_without_member == 1  # the URL that was not there: a parquet row, no image
    assert summary.problem_count == 3
    assert any("00097.tar: truncated" in p for p in summary.problems)
    assert any("00098.tar: compressed (gzip)" in p for p in summary.problems)
    assert any("00099.tar.gz: compressed tar" in p for p in summary.problems)
    methods = [method for method, _ in s3_requests.requests()]
    assert "PUT" not in methods and "POST" not in methods  # nothing copied
    tar_gets = [path for method, path in s3_requests.requests() if method == "GET" and path.endswith(".tar")]
    assert sorted(tar_gets) == sorted(
        f"/{bucket}/shards/{n:05d}.tar" for n in (0, 1, 2, 97, 98)
    )  # one read each

    located = db.execute(
        f"SELECT c.key, s.uri, l.byte_offset, l.byte_length FROM {name} c"
        " JOIN locations l ON l.id = c.id JOIN datasets d ON d.id = l.dataset AND d.name = %s"
        " JOIN shards s ON s.id = l.shard",
        (name,),
    ).fetchall()
    assert len(located) == 25
    for key, uri, offset, length in located:
        with tarfile.open(img2dataset_shards / uri.rsplit("/", 1)[1]) as tar:
            member = tar.getmember(f"{key}.jpg")
            assert (member.offset_data, member.size) == (offset, length)
            expected = tar.extractfile(member).read()  # type: ignore[union-attr]
        bucket_name, shard_key = uri[5:].split("/", 1)
        assert store.get(bucket_name, shard_key)[offset : offset + length] == expected
    selected = quarry.sql(f"SELECT key, caption FROM {name} WHERE score < 0.2 AND status = 'success'")
    assert len(selected) == 5 and all(c.startswith("caption of ") for c in selected["caption"])

    again = quarry.ingest(f"s3://{bucket}/shards/", dataset=name)
    assert (again.shards, again.shards_present, again.images) == (0, 3, 0)


def test_a_tar_written_here_indexes_like_tarfile_reads_it() -> None:
    """Long names (GNU/PAX headers) and nested folders: offsets as Python's tarfile finds them."""
    from common.ingest.tar_index import index_tar

    buffer = io.BytesIO()
    names = ["a/000.jpg", "a/000.json", f"{'long' * 40}/001.jpg", "002.seg.png"]
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for number, member in enumerate(names):
            data = bytes([number]) * (700 + number)
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    indexed = list(index_tar(io.BytesIO(data), len(data), "test.tar"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [(m.offset, m.length) for m in indexed] == [(i.offset_data, i.size) for i in tar.getmembers()]
    assert [(m.key, m.extension) for m in indexed] == [
        ("a/000", "jpg"),
        ("a/000", "json"),
        (f"{'long' * 40}/001", "jpg"),
        ("002", "seg.png"),
    ]


def test_the_cli_takes_column_types_prints_json_and_refuses_with_one_line(
    test_env: dict[str, str], db: psycopg.Connection, tmp_path: Path, workers: Stack
) -> None:
    name = f"cli_{uuid.uuid4().hex[:6]}"
    (tmp_path / "rows.csv").write_text("sku,image,price,added\nA-1,s3://b/a.jpg,1.5,2024-01-02\nB-2,,2.25,\n")
    result = run_cli(
        "ingest",
        str(tmp_path / "rows.csv"),
        "--dataset",
        name,
        "--id-column",
        "sku",
        "--image-column",
        "image",
        "--column-type",
        "price=numeric(10,2)",
        "--json",
        env=test_env,
    )
    summary = json.loads(result.stdout)
    assert (summary["dataset"], summary["rows"], summary["images"], summary["missing"]) == (name, 2, 2, 0)
    assert column_types(db, name) == {
        "id": "bigint",
        "sku": "text",
        "image": "text",
        "price": "numeric",
        "added": "date",
    }
    refused = run_cli(
        "ingest",
        str(tmp_path / "rows.csv"),
        "--dataset",
        name,
        "--id-column",
        "nope",
        "--image-column",
        "image",
        env=test_env,
        check=False,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: manifest {tmp_path / 'rows.csv'}: no column 'nope' (columns: sku, image, price, added)"
    ]


def test_a_folder_of_images_is_packed_in_id_order_into_one_shard(
    quarry: Quarry, db: psycopg.Connection, store: ObjectStore, tmp_path: Path
) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    for path in sample_images(6):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "readme.txt").write_text("not an image")
    name = f"pictures_{uuid.uuid4().hex[:6]}"

    summary = quarry.ingest(folder, dataset=name)

    assert (summary.rows, summary.packed, summary.shards, summary.unrecognised_files) == (6, 6, 1, 1)
    located = db.execute(
        "SELECT l.id, l.byte_offset, l.byte_length FROM locations l JOIN datasets d ON d.id = l.dataset"
        " WHERE d.name = %s ORDER BY l.byte_offset",
        (name,),
    ).fetchall()
    assert [image_id for image_id, _, _ in located] == sorted(int(p.stem) for p in sample_images(6))
    assert db.execute(f"SELECT file FROM {name} ORDER BY id LIMIT 1").fetchone() == (
        sample_images(6)[0].name,
    )
