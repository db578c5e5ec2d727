"""Whether a descriptor can tell an altered copy of a catalog photograph from another product
that looks like it (docs/content.md, "Near-duplicates: not built yet").

Each image of the dataset gets altered copies (JPEG at quality 15 and 30, shrunk to half and
enlarged back, cropped 4 % a side, brightened, darkened); each descriptor is an L2-normalised
vector compared by cosine distance (pixel descriptors mean-centred first; the model's embedding
as the catalog stores it). For each descriptor: the distance from each image to its nearest
*other* image (the look-alikes), the threshold that 1 % of images already reach to another, and
the share of altered copies within that threshold of their original (recall).

Run: python -m bench.near_duplicates [--dataset ../shared/fashion-sample] [--images N]
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from common.model import Classifier
from common.paths import MODELS_DIR, default_dataset_path

Image = np.ndarray
Descriptor = Callable[[Image], np.ndarray]


def jpeg(quality: int) -> Callable[[Image], Image]:
    def alter(image: Image) -> Image:
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        return cv2.imdecode(data, cv2.IMREAD_COLOR)

    return alter


def shrink_and_enlarge(image: Image) -> Image:
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def crop(fraction: float) -> Callable[[Image], Image]:
    def alter(image: Image) -> Image:
        h, w = image.shape[:2]
        dy, dx = max(1, round(fraction * h)), max(1, round(fraction * w))
        return image[dy : h - dy, dx : w - dx]

    return alter


def photometric(alpha: float, beta: float) -> Callable[[Image], Image]:
    return lambda image: cv2.convertScaleAbs(image, alpha=alpha, beta=beta)


ALTERATIONS: dict[str, Callable[[Image], Image]] = {
    "jpeg q15": jpeg(15),
    "jpeg q30": jpeg(30),
    "shrink 1/2 + enlarge": shrink_and_enlarge,
    "crop 4% a side": crop(0.04),
    "brighter (x1.2 +25)": photometric(1.2, 25),
    "darker (x0.8 -20)": photometric(0.8, -20),
}


def normalised(vector: np.ndarray) -> np.ndarray:
    vector = vector.astype(np.float32).reshape(-1)
    vector = vector - vector.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def trimmed_square(image: Image) -> np.ndarray:
    """The image without its uniform border (the colour of its edge, when most of the edge is
    that colour), centred on a square of that colour: crops of the background do not move it."""
    f = image.astype(np.float32)
    edge = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    background = np.median(edge, axis=0)
    away = np.abs(f - background).max(axis=2)
    tolerance = max(8.0, 0.12 * float(away.max()))
    y0, y1, x0, x1 = 0, f.shape[0], 0, f.shape[1]
    if (np.abs(edge - background).max(axis=1) <= tolerance).mean() >= 0.8:
        mask = away > tolerance
        rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
        cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
        if len(rows) and len(cols):
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    region = f[y0:y1, x0:x1]
    side = max(region.shape[:2])
    square = np.empty((side, side, 3), np.float32)
    square[:] = background
    oy, ox = (side - region.shape[0]) // 2, (side - region.shape[1]) // 2
    square[oy : oy + region.shape[0], ox : ox + region.shape[1]] = region
    return square


def colour_thumbnail(size: int) -> Descriptor:
    def describe(image: Image) -> np.ndarray:
        return normalised(cv2.resize(trimmed_square(image), (size, size), interpolation=cv2.INTER_AREA))

    return describe


def grey_thumbnail(size: int) -> Descriptor:
    def describe(image: Image) -> np.ndarray:
        grey = cv2.cvtColor(trimmed_square(image), cv2.COLOR_BGR2GRAY)
        return normalised(cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA))

    return describe


def dct_hash(image: Image) -> np.ndarray:
    """A 64-bit perceptual hash (the 8 x 8 lowest DCT frequencies of a 32 x 32 grey image
    against their median) as +-1 values: cosine distance is Hamming distance / 32."""
    grey = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(grey.astype(np.float32))[:8, :8].reshape(-1)
    return np.where(low > np.median(low), 1.0, -1.0).astype(np.float32) / 8.0


Describe = Callable[[list[Image]], np.ndarray]


def each(describe: Descriptor) -> Describe:
    return lambda images: np.stack([describe(image) for image in images])


def model_embedding(name: str) -> Describe:
    """A model's embedding output (what `embeddings` holds), 64 images a run."""

    def describe(images: list[Image]) -> np.ndarray:
        classifier = Classifier(MODELS_DIR / f"{name}.onnx", providers=["CPUExecutionProvider"])
        vectors = []
        for start in range(0, len(images), 64):
            vectors += [p.embedding for p in classifier.predict(images[start : start + 64])]
        matrix = np.asarray(vectors, dtype=np.float32)
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)  # cosine distance, as pgvector's <=>

    return describe


DESCRIPTORS: dict[str, Describe] = {
    "copy model's embedding": model_embedding("fashion-copies"),
    "classifier's embedding": model_embedding("fashion-classifier"),
    "64-bit DCT hash": each(dct_hash),
    "colour 12x12, trimmed": each(colour_thumbnail(12)),
    "colour 16x16, trimmed": each(colour_thumbnail(16)),
    "grey 32x32, trimmed": each(grey_thumbnail(32)),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=default_dataset_path())
    parser.add_argument("--images", type=int, default=4000)
    args = parser.parse_args()
    paths = sorted((args.dataset / "images").glob("*.jpg"))[: args.images]
    images = [image for image in (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths) if image is not None]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(images)} images of {args.dataset};"
        " recall = altered copies within the distance 1 % of images reach to another image"
    )
    altered = {name: [alter(image) for image in images] for name, alter in ALTERATIONS.items()}
    header = f"{'descriptor':24} {'nearest other p1/p50':>22} " + " ".join(f"{n:>20}" for n in ALTERATIONS)
    print(header)
    for name, describe in DESCRIPTORS.items():
        originals = describe(images)
        similarity = originals @ originals.T
        np.fill_diagonal(similarity, -np.inf)
        nearest = 1.0 - similarity.max(axis=1)
        threshold = float(np.percentile(nearest, 1))
        cells = []
        for copies in altered.values():
            distance = 1.0 - (describe(copies) * originals).sum(axis=1)
            cells.append(f"{np.mean(distance <= threshold):.3f} (med {np.median(distance):.3f})")
        print(
            f"{name:24} {threshold:>10.4f}/{np.median(nearest):<11.4f} " + " ".join(f"{c:>20}" for c in cells)
        )
    sweep(images, altered, DESCRIPTORS[SWEPT])


SWEPT = "copy model's embedding"  # the descriptor `producer duplicates` uses by default
THRESHOLDS = (0.03, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2)


def sweep(images: list[Image], altered: dict[str, list[Image]], describe: Describe) -> None:
    """For each threshold: the share of originals with another original within it (look-alikes
    joined, and the archive's own copies: those with an identical 64-bit DCT hash counted
    apart), and each alteration's recall."""
    originals = describe(images)
    similarity = originals @ originals.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = 1.0 - similarity.max(axis=1)
    hashes = each(dct_hash)(images)
    same = hashes @ hashes.T
    np.fill_diagonal(same, -np.inf)
    twin = same.max(axis=1) >= 1.0 - 1e-6  # another image with the identical hash
    distances = {name: 1.0 - (describe(copies) * originals).sum(axis=1) for name, copies in altered.items()}
    print(f"\n{SWEPT}, by threshold ({twin.sum()} images have an identical-hash twin):")
    for threshold in THRESHOLDS:
        joined = nearest <= threshold
        recalls = "  ".join(f"{name} {np.mean(d <= threshold):.3f}" for name, d in distances.items())
        print(
            f"  {threshold:.2f}: originals joined {joined.mean():.2%} ({joined.sum()},"
            f" {np.sum(joined & twin)} of them identical-hash twins); {recalls}"
        )


if __name__ == "__main__":
    main()
