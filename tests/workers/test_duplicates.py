"""Near-duplicates (`producer duplicates`, docs/content.md): altered copies of catalog photographs
found again and grouped with their original, other products (look-alikes on white backgrounds
included) never grouped, the groups recorded in `duplicates` for user SQL."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import psycopg
import pytest

from quarry import Quarry
from tests.conftest import SAMPLE, run_cli, run_job
from tests.stack import Stack

Alteration = Callable[[np.ndarray], np.ndarray]
COPY_ID = 90_000_000  # altered copies get ids from here


def jpeg(quality: int) -> Alteration:
    def alter(image: np.ndarray) -> np.ndarray:
        _, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.imdecode(data, cv2.IMREAD_COLOR)

    return alter


def shrunk_and_enlarged(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    small = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def cropped(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    dy, dx = max(1, round(0.04 * h)), max(1, round(0.04 * w))
    return image[dy : h - dy, dx : w - dx]


def darker_and_flatter(image: np.ndarray) -> np.ndarray:
    return cv2.convertScaleAbs(image, alpha=0.85, beta=-15)


ALTERATIONS = (jpeg(20), shrunk_and_enlarged, cropped, darker_and_flatter)


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, dict[int, list[int]]]:
    """A folder of the vendored sample's photographs plus, for every tenth, one altered copy per
    alteration (JPEG quality 20, shrunk and enlarged, cropped 4 % a side, darker with less
    contrast) under new ids; the groups expected: {original id: [original, copies...]}.
    (Brightening that clips the highlights is found less often: docs/content.md.)"""
    folder = tmp_path / "photos"
    folder.mkdir()
    originals = sorted((SAMPLE / "images").glob("*.jpg"), key=lambda p: int(p.stem))
    expected: dict[int, list[int]] = {}
    next_id = COPY_ID
    for index, path in enumerate(originals):
        shutil.copy(path, folder / path.name)
        if index % 10:
            continue
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        group = [int(path.stem)]
        for alter in ALTERATIONS:
            cv2.imwrite(str(folder / f"{next_id}.jpg"), alter(image), [cv2.IMWRITE_JPEG_QUALITY, 95])
            group.append(next_id)
            next_id += 1
        expected[group[0]] = group
    return folder, expected


def test_altered_copies_are_grouped_with_their_original_and_nothing_else_is(
    workers: Stack, db: psycopg.Connection, own_datasets: None, copies: tuple[Path, dict[int, list[int]]]
) -> None:
    folder, expected = copies
    name = f"dups_{uuid.uuid4().hex[:6]}"
    run_cli("ingest", str(folder), "--dataset", name, env=workers.env)
    code, summary = run_job(
        workers.env, "--query", f"SELECT id FROM {name}", "--dataset", name, "--model", "fashion-copies"
    )
    assert code == 0 and summary["failed"] == 0, summary

    said = run_cli("duplicates", name, "--json", env=workers.env).stdout.splitlines()
    groups = {entry["group"]: entry["ids"] for entry in map(json.loads, said)}
    assert groups == expected  # every copy found; no two different products grouped
    recorded = db.execute(
        "SELECT group_id, array_agg(id ORDER BY id) FROM duplicates WHERE dataset = %s AND model = %s"
        " GROUP BY group_id",
        (name, "fashion-copies"),
    ).fetchall()
    assert dict(recorded) == expected

    # one image of each group, as user SQL (the query role reads `duplicates`)
    kept = Quarry.from_env().sql(
        f"SELECT id FROM {name} WHERE id NOT IN"
        f" (SELECT id FROM duplicates WHERE dataset = '{name}' AND model = 'fashion-copies'"
        " AND id <> group_id)"
    )
    images = len(list(folder.iterdir()))
    copies_made = sum(len(ids) - 1 for ids in expected.values())
    assert len(kept) == images - copies_made

    # again: the same groups replace the rows, not add to them
    run_cli("duplicates", name, env=workers.env)
    (rows,) = db.execute("SELECT count(*) FROM duplicates WHERE dataset = %s", (name,)).fetchone()  # type: ignore[misc]
    assert rows == sum(len(ids) for ids in expected.values())
    run_cli("drop-dataset", name, env=workers.env)
    assert db.execute("SELECT count(*) FROM duplicates WHERE dataset = %s", (name,)).fetchone() == (0,)


def test_a_dataset_without_the_models_embeddings_is_refused_in_one_line(
    workers: Stack, ingested: dict[str, str]
) -> None:
    refused = run_cli("duplicates", "styles", "--model", "no-such-model", env=workers.env, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: dataset 'styles' has no embeddings under model 'no-such-model':"
        " run a job over it with --model no-such-model first"
    )
    bad = run_cli("duplicates", "styles", "--threshold", "3", env=workers.env, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --threshold 3.0 is not a cosine distance (0 to 2)"
