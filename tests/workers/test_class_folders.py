"""Class folders, as people train from them (torchvision's ImageFolder): splits, labels from the
parent folder, any file name and case, nested folders; ingested by one command, selected by SQL
on those columns, and a re-ingest that adds exactly the new images."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import cv2
import psycopg
import pytest

from tests.conftest import SAMPLE, run_cli, run_job
from tests.stack import Stack

pytestmark = pytest.mark.usefixtures("own_datasets")

SAMPLE_IMAGES = sorted(SAMPLE.glob("images/*.jpg"))
LAYOUT = {  # path below the folder -> which sample image, in which format
    "train/shoes/IMG_4001.JPG": (0, ".jpg"),
    "train/shoes/IMG_4002.jpeg": (1, ".jpg"),
    "train/shoes/side view 3.png": (2, ".png"),
    "train/shirts/summer/DSC 0001.jpg": (3, ".jpg"),
    "train/shirts/DSC 0002.webp": (4, ".webp"),
    "val/shoes/v1.jpg": (5, ".jpg"),
    "val/shirts/v2.JPG": (6, ".jpg"),
    "test/bags/t1.jpg": (7, ".jpg"),
}


def write(folder: Path, files: dict[str, tuple[int, str]]) -> None:
    for relative, (index, suffix) in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".jpg":
            shutil.copy(SAMPLE_IMAGES[index], path)
        else:
            assert cv2.imwrite(str(path), cv2.imread(str(SAMPLE_IMAGES[index])))


def ingest(env: dict[str, str], folder: Path, name: str) -> dict[str, object]:
    result = run_cli("ingest", str(folder), "--dataset", name, "--json", env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_class_folders_become_label_file_and_split_columns_and_a_reingest_adds_the_new(
    workers: Stack, test_env: dict[str, str], db: psycopg.Connection, tmp_path: Path
) -> None:
    folder, name = tmp_path / "photos", f"clothes_{uuid.uuid4().hex[:6]}"
    write(folder, LAYOUT)
    (folder / "README.txt").write_text("not an image: counted as ignored")

    first = ingest(test_env, folder, name)
    assert (first["rows"], first["images"], first["bad"], first["unrecognised_files"]) == (8, 8, 0, 1)
    rows = db.execute(f"SELECT id, label, file, split FROM {name} ORDER BY file").fetchall()
    assert [(label, file, split) for _, label, file, split in rows] == sorted(
        [
            ("bags", "test/bags/t1.jpg", "test"),
            ("shirts", "train/shirts/DSC 0002.webp", "train"),
            ("shoes", "train/shoes/IMG_4001.JPG", "train"),
            ("shoes", "train/shoes/IMG_4002.jpeg", "train"),
            ("shoes", "train/shoes/side view 3.png", "train"),
            ("summer", "train/shirts/summer/DSC 0001.jpg", "train"),
            ("shirts", "val/shirts/v2.JPG", "val"),
            ("shoes", "val/shoes/v1.jpg", "val"),
        ],
        key=lambda row: row[1],
    )
    assert len({image_id for image_id, *_ in rows}) == 8  # ids Quarry assigned

    code, summary = run_job(
        test_env, "--query", f"SELECT id FROM {name} WHERE split = 'train' AND label = 'shoes'"
    )
    assert code == 0 and (summary["state"], summary["done"], summary["failed"]) == ("finished", 3, 0)

    write(folder, {"train/bags/new one.jpg": (8, ".jpg"), "val/bags/new two.png": (9, ".png")})
    again = ingest(test_env, folder, name)
    assert (again["images"], again["present"]) == (2, 8)  # exactly the new images packed
    new = db.execute(
        f"SELECT label, split FROM {name} WHERE file LIKE '%%/bags/new %%' ORDER BY 2"
    ).fetchall()
    assert new == [("bags", "train"), ("bags", "val")]
    code, summary = run_job(test_env, "--query", f"SELECT id FROM {name} WHERE label = 'bags'")
    assert code == 0 and (summary["done"], summary["failed"]) == (3, 0)

    changed = folder / "train/shoes/IMG_4001.JPG"
    shutil.copy(SAMPLE_IMAGES[10], changed)  # another photograph under the same name
    assert changed.stat().st_size != SAMPLE_IMAGES[0].stat().st_size
    third = ingest(test_env, folder, name)
    assert (third["images"], third["replaced"], third["present"]) == (1, 1, 9)
    located = db.execute(
        f"SELECT l.byte_length FROM {name} c JOIN locations l ON l.id = c.id"
        " JOIN datasets d ON d.id = l.dataset AND d.name = %s WHERE c.file = %s",
        (name, "train/shoes/IMG_4001.JPG"),
    ).fetchall()
    assert located == [(changed.stat().st_size,)]  # one location: the new bytes


def test_one_folder_of_images_by_any_name_is_a_dataset_without_labels(
    workers: Stack, test_env: dict[str, str], db: psycopg.Connection, tmp_path: Path
) -> None:
    folder, name = tmp_path / "shoes", f"shoes_{uuid.uuid4().hex[:6]}"
    write(folder, {"IMG_1.JPG": (0, ".jpg"), "IMG_2.jpg": (1, ".jpg")})
    assert ingest(test_env, folder, name)["images"] == 2
    assert db.execute(f"SELECT label, file FROM {name} ORDER BY file").fetchall() == [
        (None, "IMG_1.JPG"),
        (None, "IMG_2.jpg"),
    ]


def test_a_folder_with_a_metadata_file_takes_its_columns_and_records_a_missing_image(
    workers: Stack, test_env: dict[str, str], db: psycopg.Connection, tmp_path: Path
) -> None:
    """Hugging Face's imagefolder: metadata.csv's `file_name` names each image below the folder."""
    folder, name = tmp_path / "hf", f"hf_{uuid.uuid4().hex[:6]}"
    write(
        folder,
        {"a.jpg": (0, ".jpg"), "sub/b.JPG": (1, ".jpg"), "c.png": (2, ".png"), "extra.jpg": (3, ".jpg")},
    )
    (folder / "metadata.csv").write_text(
        "file_name,caption,price\na.jpg,a shoe,1.5\nsub/b.JPG,a shirt,2.5\n"
        "c.png,a bag,3.5\ngone.jpg,lost,4.5\n"
    )
    summary = ingest(test_env, folder, name)
    assert (summary["rows"], summary["images"], summary["bad"], summary["unrecognised_files"]) == (4, 3, 1, 1)
    assert db.execute(f"SELECT file_name, caption, price FROM {name} ORDER BY id").fetchall() == [
        ("a.jpg", "a shoe", 1.5),
        ("sub/b.JPG", "a shirt", 2.5),
        ("c.png", "a bag", 3.5),
        ("gone.jpg", "lost", 4.5),
    ]
    code, job = run_job(test_env, "--query", f"SELECT id FROM {name} WHERE price > 1")
    assert code == 1 and (job["done"], job["failed"]) == (3, 1)  # the missing image fails alone
    errors = run_cli("results", str(job["job_id"]), env=test_env)
    assert f"no such file: {folder.resolve() / 'gone.jpg'}" in errors.stdout, errors.stdout

    again = ingest(test_env, folder, name)
    assert (again["rows"], again["images"], again["present"]) == (4, 0, 3)  # nothing new


def test_folders_without_images_or_without_file_name_are_refused_in_one_line(
    test_env: dict[str, str], db: psycopg.Connection, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    (empty / "train" / "shoes").mkdir(parents=True)
    (empty / "train" / "shoes" / "notes.txt").write_text("no image here")
    refused = run_cli("ingest", str(empty), "--dataset", "empty_classes", env=test_env, check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "nothing to ingest" in refused.stderr

    unnamed = tmp_path / "unnamed"
    write(unnamed, {"a.jpg": (0, ".jpg")})
    (unnamed / "metadata.jsonl").write_text('{"path": "a.jpg", "caption": "a shoe"}\n')
    refused = run_cli("ingest", str(unnamed), "--dataset", "no_file_name", env=test_env, check=False)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {unnamed.resolve() / 'metadata.jsonl'}: no column 'file_name' naming each image"
        " (columns: path, caption)"
    ]
    names = {row[0] for row in db.execute("SELECT name FROM datasets")}
    assert not {"empty_classes", "no_file_name"} & names
