"""A newcomer's first hour: img2dataset's output on local disk ingested with one command and its
own ids, datasets listed and dropped from the CLI and the API, the bad paths refused in one line
with nothing left behind. Real CLI, pools, dispatcher, PostgreSQL and S3 server (requests counted
from its log)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest

from common.config import Settings
from common.errors import UserError
from common.storage import ObjectStore
from quarry import Quarry
from tests.conftest import BIN, SAMPLE, run_cli, run_job
from tests.stack import RequestLog, Stack, wait_until

pytestmark = pytest.mark.usefixtures("own_datasets")


def uploads(requests: list[tuple[str, str]]) -> list[str]:
    """The paths of the requests that wrote bytes (PUT, or a multipart upload's POST)."""
    return [path.split("?")[0] for method, path in requests if method in ("PUT", "POST")]


def listed(env: dict[str, str]) -> dict[str, dict]:  # type: ignore[type-arg]
    lines = run_cli("datasets", "--json", env=env).stdout.splitlines()
    return {row["name"]: row for row in map(json.loads, lines)}


def image_folder(root: Path, count: int) -> Path:
    folder = root / f"photos-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    for path in sorted(SAMPLE.glob("images/*.jpg"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def test_a_local_img2dataset_folder_is_uploaded_as_it_is_and_keeps_its_own_ids(
    workers: Stack,
    test_env: dict[str, str],
    db: psycopg.Connection,
    img2dataset_shards: Path,
    s3_requests: RequestLog,
    tmp_path: Path,
) -> None:
    name = f"lookbook_{uuid.uuid4().hex[:6]}"
    tars = sorted(path.name for path in img2dataset_shards.glob("*.tar"))
    tables = sorted(path.name for path in img2dataset_shards.glob("*.parquet"))
    s3_requests.mark()

    ingest = run_cli("ingest", str(img2dataset_shards), "--dataset", name, "--id-column", "sku", env=test_env)

    put = uploads(s3_requests.requests())
    folder = f"/{test_env['RAW_BUCKET']}/webdataset/{name}/"
    assert sorted(put) == sorted(folder + file for file in tars + tables)  # one upload a file, no repacking
    assert re.fullmatch(
        r"ingest: 3/3 units · 25 rows · [\d,]+ rows/s · 25 images · 3 shards · 0 failed · [\d.]+ s\n",
        ingest.stderr,
    )  # its progress counts rows, images and shards, not units as images
    assert (
        f"as dataset {name}: 25 rows" in ingest.stdout
        and f"{len(tars + tables)} files uploaded" in ingest.stdout
    )
    ids = db.execute(f"SELECT sku, key FROM {name} ORDER BY sku").fetchall()
    assert [sku for sku, _ in ids] == list(range(5000, 5025))  # the shards' own integer ids
    located = db.execute(
        "SELECT l.id FROM locations l JOIN datasets d ON d.id = l.dataset WHERE d.name = %s ORDER BY l.id",
        (name,),
    ).fetchall()
    assert [row[0] for row in located] == list(range(5000, 5025))

    code, summary = run_job(test_env, "--query", f"SELECT sku AS id FROM {name} WHERE score < 0.5")
    assert code == 0 and (summary["done"], summary["failed"]) == (13, 0)  # dataset told by the query

    s3_requests.mark()
    again = run_cli(
        "ingest", str(img2dataset_shards), "--dataset", name, "--id-column", "sku", "--json", env=test_env
    )
    assert uploads(s3_requests.requests()) == []  # nothing uploaded the second time
    counts = json.loads(again.stdout)
    assert (counts["files_uploaded"], counts["shards_present"], counts["rows"]) == (0, 3, 0)

    # a changed file of a registered shard (the tar or a file beside it) is reported and left
    changed = tmp_path / "changed"
    shutil.copytree(img2dataset_shards, changed)
    pq.write_table(pq.read_table(changed / tables[0]), changed / tables[0], compression="none")
    with (changed / tars[0]).open("ab") as tar:
        tar.write(b"\0" * 512)
    s3_requests.mark()
    third = run_cli("ingest", str(changed), "--dataset", name, "--id-column", "sku", "--json", env=test_env)
    assert uploads(s3_requests.requests()) == []
    said = third.stdout + third.stderr
    for path in (changed / tars[0], changed / tables[0]):
        assert f"{path}: changed since its shard was registered; not uploaded again" in said, said
    assert json.loads(third.stdout.strip().splitlines()[-1])["files_uploaded"] == 0
    with (changed / tables[0]).open("ab") as table:  # now not Parquet at all: refused in one line
        table.write(b"\0")
    refused = run_cli(
        "ingest", str(changed), "--dataset", name, "--id-column", "sku", env=test_env, check=False
    )
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"error: {changed / tables[0]}: not a readable Parquet file ("), lines[0]


def test_ids_of_a_webdataset_must_be_an_integer_column_given_once(
    workers: Stack, settings: Settings, db: psycopg.Connection, img2dataset_shards: Path, tmp_path: Path
) -> None:
    quarry = Quarry(settings)
    name = f"twice_{uuid.uuid4().hex[:6]}"
    with pytest.raises(UserError, match=r"--id-column 'caption' is string, not integers"):
        quarry.ingest(img2dataset_shards, dataset=name, id_column="caption", progress=False)
    with pytest.raises(UserError, match=r"--id-column 'sku_id' is not a column of the shards' parquet"):
        quarry.ingest(img2dataset_shards, dataset=name, id_column="sku_id", progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(img2dataset_shards, copy)
    second = pq.read_table(copy / "00001.parquet")  # its skus made those of the first shard
    pq.write_table(
        second.set_column(
            second.column_names.index("sku"), "sku", pq.read_table(copy / "00000.parquet")["sku"]
        ),
        copy / "00001.parquet",
    )

    summary = quarry.ingest(copy, dataset=name, id_column="sku", progress=False)

    assert summary.units_failed == 1 and summary.rows == 15  # the two shards the pools took first
    # whichever of the first two shards registered second is refused whole
    duplicate = r"0000[01]\.tar: sku is not unique: already the id of another key: 5000 \(of '0000\d\d'\)"
    assert [p for p in summary.problems if re.search(duplicate, p)] == summary.problems


def test_bad_paths_are_refused_in_one_line_and_leave_no_dataset_or_job(
    workers: Stack,
    test_env: dict[str, str],
    db: psycopg.Connection,
    img2dataset_shards: Path,
    s3_requests: RequestLog,
    tmp_path: Path,
) -> None:
    jobs_before = db.execute("SELECT count(*) FROM jobs").fetchone()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not images")
    (notes / "run.log").write_text("")

    nothing = run_cli("ingest", str(notes), "--dataset", "nothing_here", env=test_env, check=False)
    assert nothing.returncode == 2
    assert nothing.stderr.splitlines() == [
        f"error: {notes} holds 2 files and no {{id}}.jpg, .tar or manifest files, and no class"
        " folders of images: nothing to ingest"
    ]
    as_folder = run_cli(
        "ingest",
        str(img2dataset_shards),
        "--dataset",
        "shards_as_images",
        "--format",
        "folder",
        env=test_env,
        check=False,
    )
    assert as_folder.returncode == 2
    assert as_folder.stderr.splitlines() == [
        f"error: {img2dataset_shards} holds 3 WebDataset shards and no {{id}}.jpg files:"
        " run with --format webdataset"
    ]

    name = f"photos_{uuid.uuid4().hex[:6]}"
    photos = image_folder(tmp_path, 4)
    unused = run_cli(
        "ingest", str(photos), "--dataset", name, "--id-column", "sku", env=test_env, check=False
    )
    assert unused.returncode == 2
    assert unused.stderr.splitlines() == [
        f"error: {photos}: a folder of images takes its ids from the file names ({{id}}.jpg):"
        " drop --id-column"
    ]
    run_cli("ingest", str(photos), "--dataset", name, env=test_env)
    s3_requests.mark()
    differing = run_cli("ingest", str(img2dataset_shards), "--dataset", name, env=test_env, check=False)
    assert differing.returncode == 2
    assert differing.stderr.splitlines() == [
        f"error: dataset {name} exists with other columns (only in the dataset: file; only in this source:"
        " score, sku, caption, url, key, status, error_message, width, height, original_width,"
        " original_height, exif, sha256): ingest into a new dataset, or drop this one first"
        " (`producer drop-dataset`)"
    ]
    assert uploads(s3_requests.requests()) == []  # refused before anything was uploaded

    running = subprocess.Popen(  # its selection takes 10 minutes to read: the job runs until cancelled
        [str(BIN / "producer"), "run", "--query", f"SELECT id FROM {name}, pg_sleep(600)"],
        env={**os.environ, **test_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: (
            db.execute("SELECT count(*) FROM jobs WHERE spec->>'dataset' = %s", (name,)).fetchone() == (1,)
        ),
        30,
        "the job recorded",
    )
    (job_id,) = db.execute("SELECT id FROM jobs WHERE spec->>'dataset' = %s", (name,)).fetchone()  # type: ignore[misc]
    in_use = run_cli("drop-dataset", name, env=test_env, check=False)
    assert in_use.returncode == 2
    assert in_use.stderr.splitlines() == [
        f"error: dataset {name} is in use by running job {job_id}: cancel it or let it end first"
    ]
    assert run_cli("cancel", str(job_id), env=test_env).stdout.strip() == f"job {job_id}: cancelled"
    running.communicate(timeout=60)  # the cancel cut its selection short
    assert db.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone() == ("cancelled",)
    assert name in listed(test_env)
    run_cli("drop-dataset", name, env=test_env)

    assert not {"nothing_here", "shards_as_images", name} & set(listed(test_env))
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == jobs_before[0] + 1  # type: ignore[index]


def test_datasets_are_listed_and_dropped_from_the_cli_and_the_api(
    workers: Stack,
    test_env: dict[str, str],
    settings: Settings,
    db: psycopg.Connection,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    folder = image_folder(tmp_path, 5)
    name = f"mine_{uuid.uuid4().hex[:6]}"
    run_cli("ingest", str(folder), "--dataset", name, env=test_env)
    packed = store.list_keys(test_env["RAW_BUCKET"], f"packed/{name}/")
    shard_size = store.head(test_env["RAW_BUCKET"], packed[0])[0]

    row = listed(test_env)[name]
    assert {k: row[k] for k in ("format", "source", "rows", "images", "shards", "size")} == {
        "format": "folder",
        "source": str(folder.resolve()),
        "rows": 5,
        "images": 5,
        "shards": 1,
        "size": shard_size,
    }
    table = run_cli("datasets", env=test_env).stdout.splitlines()
    assert table[0].split() == ["name", "format", "rows", "images", "shards", "size", "registered", "source"]
    assert any(line.startswith(name) and str(folder.resolve()) in line for line in table[1:])

    dropped = run_cli("drop-dataset", name, env=test_env)
    assert dropped.stdout.strip() == f"dataset {name} dropped (1 objects Quarry wrote for it deleted)"
    assert store.list_keys(test_env["RAW_BUCKET"], f"packed/{name}/") == []
    assert db.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,)
    assert name not in listed(test_env)

    quarry = Quarry(settings)
    again = quarry.ingest(folder, dataset=name)  # the same name, the same folder: registered anew
    assert (again.rows, again.images, again.packed) == (5, 5, 5)
    frame = quarry.datasets()
    assert frame.set_index("name").loc[name, ["rows", "images", "shards"]].tolist() == [5, 5, 1]
    assert quarry.drop_dataset(name) == 1
    assert name not in quarry.datasets()["name"].tolist()
    with pytest.raises(UserError, match=f"no dataset '{name}'"):
        quarry.drop_dataset(name)
