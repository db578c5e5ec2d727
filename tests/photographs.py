"""Large photographs for tests, from the vendored sample's real product photographs tiled at
their native 60x80 (never upscaled), and a decompression bomb."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SAMPLE_IMAGES = sorted((Path(__file__).resolve().parent.parent / "data" / "sample" / "images").glob("*.jpg"))
TILE_WIDTH, TILE_HEIGHT = 60, 80


def mosaic(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A width x height BGR image of real photographs side by side, each at its own size."""
    rng = np.random.default_rng(seed)
    tiles = [cv2.imread(str(path)) for path in rng.choice(np.array(SAMPLE_IMAGES), 64)]
    padded = [
        cv2.copyMakeBorder(
            tile, 0, TILE_HEIGHT - tile.shape[0], 0, TILE_WIDTH - tile.shape[1], cv2.BORDER_REPLICATE
        )
        for tile in tiles
    ]
    rows = [
        np.hstack([padded[(row * 7 + column) % len(padded)] for column in range(-(-width // TILE_WIDTH))])
        for row in range(-(-height // TILE_HEIGHT))
    ]
    return np.ascontiguousarray(np.vstack(rows)[:height, :width])


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def with_comment(data: bytes, text: str) -> bytes:
    """The same JPEG with a comment segment (COM) after its start marker: other bytes, same pixels."""
    comment = text.encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small JPEG whose frame header declares width x height, as a decompression bomb does."""
    data = bytearray(jpeg(np.full((8, 8, 3), 128, np.uint8)))
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length, precision, height, width
    data[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)
