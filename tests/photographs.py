"""Large photographs for tests, from the vendored sample's real product photographs tiled at
their native 60x80 (never upscaled), and decompression bombs of several formats."""

from __future__ import annotations

import struct
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


def with_stray_byte(data: bytes) -> bytes:
    """The same JPEG with one stray byte between its first two segments: libjpeg skips it with a
    warning and decodes the frame; a header walker that stops at it reads no size."""
    second = data.index(b"\xff", 2 + 2 + int.from_bytes(data[4:6], "big"))
    return data[:second] + b"\x00" + data[second:]


def tiff_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """An uncompressed 8-bit grey TIFF whose directory declares width x height, a few bytes of data."""
    entries = [  # tag, type (3 short, 4 long), count, value
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 12 * 8 + 4),
        (278, 4, 1, height),
        (279, 4, 1, width * height),
    ]
    directory = len(entries).to_bytes(2, "little") + b"".join(
        struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in entries
    )
    return b"II*\x00" + (8).to_bytes(4, "little") + directory + b"\x00" * 4 + b"\x80" * 1024


def bmp_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A 24-bit BMP whose header declares width x height, a kilobyte of pixels."""
    size = width * height * 3
    header = b"BM" + struct.pack("<IHHI", 54 + size, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, size, 2835, 2835, 0, 0)
    return header + info + b"\x80" * 1024


def png_with_alpha(width: int, height: int) -> bytes:
    """A PNG with an alpha channel that fades across the image."""
    image = np.zeros((height, width, 4), np.uint8)
    image[:, :, 1] = 200
    image[:, :, 3] = np.linspace(0, 255, width, dtype=np.uint8)
    return cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
