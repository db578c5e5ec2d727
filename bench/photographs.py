"""Photographs at the sizes users have, made from the real photographs scikit-image ships in its
wheel (`pip install -e '.[bench]'`), never upscaled: at 256 pixels on the long side, a crop of
one photograph shrunk to size; at 1,024 and 3,000 pixels, mosaics of them at their native
resolution (the largest ships at 1,411 pixels). Each image is its own crop or arrangement,
encoded as JPEG at quality 90, 3:2 landscape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

PHOTOGRAPHS = (  # the colour photographs among scikit-image's data files
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
)
QUALITY = 90


def source_photographs() -> list[np.ndarray]:
    import skimage.data  # the bench extra: its wheel carries the files

    folder = Path(skimage.data.__file__).parent
    return [cv2.imread(str(folder / name), cv2.IMREAD_COLOR) for name in PHOTOGRAPHS]


def photograph(photos: list[np.ndarray], long_side: int, rng: np.random.Generator) -> np.ndarray:
    """One long_side x (2/3 long_side) image from `photos`, shrunk or tiled, never enlarged."""
    width, height = long_side, round(long_side * 2 / 3)
    fitting = [p for p in photos if p.shape[1] >= width and p.shape[0] >= height]
    if fitting:
        photo = fitting[int(rng.integers(len(fitting)))]
        scale = rng.uniform(max(width / photo.shape[1], height / photo.shape[0]), 1.0)
        crop_width, crop_height = round(width / scale), round(height / scale)
        top = int(rng.integers(0, photo.shape[0] - crop_height + 1))
        left = int(rng.integers(0, photo.shape[1] - crop_width + 1))
        window = photo[top : top + crop_height, left : left + crop_width]
        return cv2.resize(window, (width, height), interpolation=cv2.INTER_AREA)
    return mosaic(photos, width, height, rng)


def mosaic(photos: list[np.ndarray], width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of whole photographs at their own size, each row as tall as its shortest one."""
    rows, filled = [], 0
    while filled < height:
        row, row_width = [], 0
        while row_width < width:
            photo = photos[int(rng.integers(len(photos)))]
            if rng.random() < 0.5:
                photo = cv2.flip(photo, 1)
            row.append(photo)
            row_width += photo.shape[1]
        row_height = min(photo.shape[0] for photo in row)
        rows.append(np.hstack([photo[:row_height] for photo in row])[:, :width])
        filled += row_height
    return np.ascontiguousarray(np.vstack(rows)[:height])


def jpeg_photographs(long_side: int, count: int, seed: int = 0) -> Iterator[bytes]:
    """`count` JPEG photographs of `long_side` pixels, the same ones for the same seed."""
    photos = source_photographs()
    rng = np.random.default_rng([seed, long_side])
    for _ in range(count):
        image = photograph(photos, long_side, rng)
        yield cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes()


def counts_by_side(items: list[str]) -> dict[int, int]:
    """`--counts` as the benches take it: LONG_SIDE=COUNT items, e.g. 1024=100 3000=30."""
    return {int(side): int(count) for side, count in (item.split("=") for item in items)}
