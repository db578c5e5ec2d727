"""Augmentation throughput: Quarry's pipeline vs albumentations 2.x on the same 4-op chain.

Run: python -m bench.augment [DATASET] [--images N]. One core (OpenCV single-threaded), the same
decoded images, interleaved rounds; prints images/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np

from common.augment import Pipeline, parse_spec
from common.images import decode
from common.paths import default_dataset_path

CHAIN = "hflip(p=0.5) | rotate(limit=15) | brightness_contrast(0.2, 0.2) | resize(224, 224)"


def load(dataset: Path, count: int) -> list[np.ndarray]:
    paths = sorted((dataset / "images").glob("*.jpg"))[:count]
    return [decode(path.read_bytes()) for path in paths]


def albumentations_chain():  # type: ignore[no-untyped-def]
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Rotate(limit=15, border_mode=cv2.BORDER_REFLECT_101, p=1.0),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
            A.Resize(224, 224),
        ]
    )


def time_quarry(images: list[np.ndarray], pipeline: Pipeline) -> float:
    started = time.perf_counter()
    for index, image in enumerate(images):
        pipeline.apply(image, (0, index, 0))
    return len(images) / (time.perf_counter() - started)


def time_albumentations(images: list[np.ndarray], chain) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    for image in images:
        chain(image=image)["image"]
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", nargs="?", type=Path, default=default_dataset_path())
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    images = load(args.dataset, args.images)
    pipeline = Pipeline.from_spec(parse_spec(CHAIN).stages)
    chain = albumentations_chain()
    time_quarry(images[:50], pipeline), time_albumentations(images[:50], chain)  # warm-up
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(time_quarry(images, pipeline))
        theirs.append(time_albumentations(images, chain))
    import albumentations

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread used; "
        f"{len(images)} images from {args.dataset}"
    )
    print(f"chain: {CHAIN}")
    print(f"quarry        : {np.median(ours):8.1f} images/s per core (median of {args.rounds})")
    print(f"albumentations: {np.median(theirs):8.1f} images/s per core ({albumentations.__version__})")
    print(f"ratio quarry/albumentations: {np.median(ours) / np.median(theirs):.2f}")


if __name__ == "__main__":
    main()
