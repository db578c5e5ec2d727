"""How well the shipped model's embeddings find images of the same kind: for every image of the
fashion sample whose article type has at least --min-type images, the share of its 10 nearest
other images (cosine distance over the model's embedding output, exact) that have its article
type, against the share a random choice of 10 would have (the sum of the types' squared shares).
Embeddings are computed here with the model as the inference pool runs it (same preprocessing).

Run: python -m bench.neighbours [DATASET_DIR] [--min-type 10]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
from collections import Counter
from pathlib import Path

import numpy as np

from common.images import decode
from common.model import Classifier
from common.paths import MODELS_DIR, default_dataset_path
from training.dataset import is_held_out

BATCH = 256


def article_types(dataset: Path) -> dict[int, str]:
    """Image id -> article type, from the archive's styles.csv (its extra commas are in the
    product name, after the column we read)."""
    with (dataset / "styles.csv").open(newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        header = next(rows)
        column = header.index("articleType")
        return {int(row[0]): row[column] for row in rows if row and row[0].isdigit()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", type=Path, default=default_dataset_path())
    parser.add_argument("--min-type", type=int, default=10)
    args = parser.parse_args()
    types = article_types(args.dataset)
    ids = sorted(i for i in types if (args.dataset / "images" / f"{i}.jpg").is_file())
    model = Classifier(MODELS_DIR / "fashion-classifier.onnx", providers=["CPUExecutionProvider"])
    vectors = []
    for start in range(0, len(ids), BATCH):
        images = [
            decode((args.dataset / "images" / f"{i}.jpg").read_bytes()) for i in ids[start : start + BATCH]
        ]
        vectors += [p.embedding for p in model.predict(images, 1)]
    embedded = np.asarray(vectors, dtype=np.float32)
    embedded /= np.linalg.norm(embedded, axis=1, keepdims=True)
    counts = Counter(types[i] for i in ids)
    anchors = [n for n, i in enumerate(ids) if counts[types[i]] >= args.min_type]
    shared: dict[bool, list[int]] = {True: [], False: []}
    for n in anchors:
        similarity = embedded @ embedded[n]
        similarity[n] = -2.0
        nearest = np.argpartition(-similarity, 10)[:10]
        shared[is_held_out(ids[n])].append(sum(types[ids[m]] == types[ids[n]] for m in nearest))
    everyone = shared[True] + shared[False]
    rate = sum(everyone) / (10 * len(everyone))
    held_out = sum(shared[True]) / (10 * max(len(shared[True]), 1))
    chance = sum((count / len(ids)) ** 2 for count in counts.values())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(ids):,} images of {args.dataset},"
        f" {len(counts)} article types; anchors: the {len(anchors):,} images of the"
        f" {sum(c >= args.min_type for c in counts.values())} types with >= {args.min_type} images"
    )
    print(
        f"the 10 nearest others share the anchor's article type: {rate:.3f}"
        f" (a random choice of 10: {chance:.3f}; {rate / chance:.1f}x); anchors the model was not"
        f" trained on ({len(shared[True]):,}, training/dataset.py's held-out split): {held_out:.3f}"
    )


if __name__ == "__main__":
    main()
