"""An image's size read from its header, without decoding it: JPEG, PNG and WebP.

Reading a header costs microseconds where decoding costs milliseconds, so the transform stage
can choose a JPEG's decode scale and refuse a decompression bomb before any pixel exists. Sizes
are as displayed: a JPEG whose EXIF orientation turns it a quarter (OpenCV applies it when it
decodes) has its width and height swapped.
"""

from __future__ import annotations

from dataclasses import dataclass

JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn: not DHT, JPG, DAC
JPEG_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RSTn, SOI: no length
JPEG_START_OF_SCAN = 0xDA
EXIF_ORIENTATION_TAG = 0x0112
QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Header:
    image_format: str  # jpeg, png or webp
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes) -> Header | None:
    """The format and displayed size of an image, or None when its header is not one of these
    formats or cannot be read (the decoder then has the last word)."""
    if data.startswith(b"\xff\xd8"):
        return jpeg_header(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        return Header("png", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return webp_header(data)
    return None


def jpeg_header(data: bytes) -> Header | None:
    """Walk the markers up to the first frame header (SOFn), noting an EXIF orientation. Stray
    bytes between segments are skipped up to the next 0xFF, as libjpeg skips them (with a
    warning) before it decodes the frame: the size read is the size it will decode."""
    position, turned = 2, False
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            position = data.find(b"\xff", position)
            if position < 0:
                return None
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        if marker == JPEG_START_OF_SCAN:
            return None
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment = data[position + 4 : position + 2 + length]
        if marker in JPEG_FRAME_MARKERS and len(segment) >= 5:
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            return Header("jpeg", height, width) if turned else Header("jpeg", width, height)
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            turned = exif_orientation(segment[6:]) in QUARTER_TURNS
        position += 2 + length
    return None


def exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of EXIF's first image directory (a TIFF structure), if present."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None

    def number(start: int, size: int) -> int:
        return int.from_bytes(tiff[start : start + size], order)  # type: ignore[arg-type]

    directory = number(4, 4)
    for entry in range(number(directory, 2)):
        start = directory + 2 + 12 * entry
        if start + 12 > len(tiff):
            return None
        if number(start, 2) == EXIF_ORIENTATION_TAG:
            return number(start + 8, 2)
    return None


def webp_header(data: bytes) -> Header | None:
    """The canvas size of a lossy (VP8), lossless (VP8L) or extended (VP8X) WebP."""

    def little(start: int, end: int) -> int:
        return int.from_bytes(data[start:end], "little")

    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return Header("webp", 1 + little(24, 27), 1 + little(27, 30))
    if chunk == b"VP8L" and len(data) >= 25:
        bits = little(21, 25)
        return Header("webp", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
    if chunk == b"VP8 " and len(data) >= 30:
        return Header("webp", little(26, 28) & 0x3FFF, little(28, 30) & 0x3FFF)
    return None
