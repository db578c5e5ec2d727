"""The labelled data for training: styles.csv rows with images, a deterministic split, labels."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.catalog import CatalogStats, RejectedLine, read_styles
from common.images import decode
from common.model import Preprocess

HELD_OUT_PERCENT = 20
RARE_BELOW = 10  # article types with fewer training images become "Other <master category>"


def is_held_out(image_id: int) -> bool:
    """The split is a hash of the id: stable across runs, machines and dataset sizes."""
    digest = hashlib.sha256(str(image_id).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


@dataclass
class Example:
    image_id: int
    article_type: str
    master_category: str
    sub_category: str
    folder: Path  # the dataset folder holding images/{image_id}.jpg

    @property
    def image_path(self) -> Path:
        return self.folder / "images" / f"{self.image_id}.jpg"


def load_examples(datasets: list[Path]) -> list[Example]:
    """Rows of each folder's styles.csv that have an image and an article type; an id seen in
    an earlier folder is not taken again."""
    examples, seen = [], set()
    for dataset in datasets:
        for row in read_styles(dataset / "styles.csv", CatalogStats()):
            if isinstance(row, RejectedLine) or row[4] is None or row[2] is None or row[0] in seen:
                continue
            if (dataset / "images" / f"{row[0]}.jpg").is_file():
                examples.append(Example(row[0], row[4], row[2], row[3] or "", dataset))
                seen.add(row[0])
    return examples


def label_set(train: list[Example]) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Labels (frequent article types plus one `Other <master>` per master category), the
    hierarchy label -> [master, sub], and the map article type -> label."""
    counts = Counter(example.article_type for example in train)
    masters: dict[str, Counter[str]] = {}
    subs: dict[str, Counter[str]] = {}
    for example in train:
        masters.setdefault(example.article_type, Counter())[example.master_category] += 1
        subs.setdefault(example.article_type, Counter())[example.sub_category] += 1
    mapping, hierarchy = {}, {}
    for article_type, count in counts.items():
        master = masters[article_type].most_common(1)[0][0]
        if count >= RARE_BELOW:
            mapping[article_type] = article_type
            hierarchy[article_type] = [master, subs[article_type].most_common(1)[0][0]]
        else:
            mapping[article_type] = f"Other {master}"
            hierarchy[f"Other {master}"] = [master, "Other"]
    return sorted(hierarchy), hierarchy, mapping


def load_pixels(examples: list[Example], preprocess: Preprocess) -> np.ndarray:
    """N x H x W x 3 uint8 RGB, fitted by the model's own resize rule."""
    pixels = np.empty((len(examples), preprocess.height, preprocess.width, 3), dtype=np.uint8)
    for index, example in enumerate(examples):
        image = decode(example.image_path.read_bytes())
        pixels[index] = preprocess.fit(image)[..., ::-1]
    return pixels
