"""Decoding and encoding images: whatever comes in becomes 8-bit BGR."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from common.errors import ImageDecodeError, ImageTooLarge
from common.image_header import Header, read_header
from common.opencv import LIMIT_IN_FORCE, LIMIT_REFUSAL, PIXEL_LIMIT, cv2

ENCODINGS = {  # format name -> (file extension, content type)
    "jpeg": (".jpg", "image/jpeg"),
    "png": (".png", "image/png"),
    "webp": (".webp", "image/webp"),
}
ALPHA_BACKGROUND = 255  # transparent pixels are composited on white, like a product page
ALPHA_ROWS = 256  # rows composited at once: the 16-bit scratch is this many rows, not the image
REDUCED_READS = {  # libjpeg's DCT-domain scales, largest reduction first
    8: cv2.IMREAD_REDUCED_COLOR_8,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    2: cv2.IMREAD_REDUCED_COLOR_2,
}


def checksum(data: bytes) -> str:
    """The sha256 of a file's bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, floor: tuple[int, int] | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Bytes to an HxWx3 uint8 BGR array: EXIF rotation applied, CMYK/gray/16-bit converted,
    alpha composited on white. A JPEG is decoded at the smallest libjpeg scale that keeps at
    least `floor` (width, height) pixels; None: in full. An image whose header declares more
    than `max_pixels` is refused before any pixel is decoded; one whose header Quarry cannot
    read (TIFF, BMP, PNM, a damaged JPEG) meets OpenCV's own limit, set from IMAGE_MAX_PIXELS
    (common/opencv.py), in OpenCV's reading of its header."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    header = read_header(data)
    if header is not None and max_pixels is not None and header.pixels > max_pixels:
        raise ImageTooLarge(
            f"image too large: {header.width}×{header.height} ({header.pixels:,} pixels;"
            f" IMAGE_MAX_PIXELS is {max_pixels:,})"
        )
    if header is None and not LIMIT_IN_FORCE:
        raise ImageTooLarge(
            f"image size unreadable from its header ({len(data):,} bytes) and OpenCV's pixel limit is"
            " not in force in this process (cv2 was loaded before Quarry): refused undecoded"
        )
    buffer = np.frombuffer(data, dtype=np.uint8)
    if has_alpha_container(data):
        image = imdecode(buffer, cv2.IMREAD_UNCHANGED)
        if image is not None and image.ndim == 3 and image.shape[2] == 4:
            return composite_alpha(to_uint8(image))
    scale = decode_scale(header, floor)
    image = imdecode(buffer, REDUCED_READS[scale] if scale > 1 else cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageDecodeError(f"not a decodable image ({len(data)} bytes)")
    return image


def imdecode(buffer: np.ndarray, flags: int) -> np.ndarray | None:
    """cv2.imdecode; ImageTooLarge when OpenCV's own pixel limit refuses the image's header."""
    try:
        return cv2.imdecode(buffer, flags)
    except cv2.error as exc:
        if LIMIT_REFUSAL in str(exc):
            raise ImageTooLarge(
                f"image too large: its header declares more than {PIXEL_LIMIT:,} pixels"
                f" (IMAGE_MAX_PIXELS, checked by OpenCV; {len(buffer):,} bytes, undecoded)"
            ) from exc
        raise ImageDecodeError(f"not a decodable image ({len(buffer)} bytes)") from exc


def decode_scale(header: Header | None, floor: tuple[int, int] | None) -> int:
    """The largest libjpeg scale denominator (8, 4, 2) at which a JPEG still has `floor` pixels
    on each side (libjpeg rounds a scaled side up); 1 for a full decode. Only JPEGs: OpenCV
    decodes other formats in full and resizes them, which is slower than what the ops do."""
    if floor is None or header is None or header.image_format != "jpeg":
        return 1
    for denominator in REDUCED_READS:
        if (
            math.ceil(header.width / denominator) >= floor[0]
            and math.ceil(header.height / denominator) >= floor[1]
        ):
            return denominator
    return 1


def has_alpha_container(data: bytes) -> bool:
    """Formats that may carry an alpha channel (PNG, WebP)."""
    return data.startswith(b"\x89PNG") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale 16-bit or float pixels down to 8 bits."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    return np.clip(image * 255.0, 0, 255).astype(np.uint8)


def composite_alpha(bgra: np.ndarray) -> np.ndarray:
    """Blend a BGRA image over a white background, in integers (rounded as x / 255 rounds),
    ALPHA_ROWS rows at a time: no float copy of the image, a scratch of a few rows."""
    height, width = bgra.shape[:2]
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, ALPHA_ROWS):
        rows = bgra[top : top + ALPHA_ROWS]
        alpha = rows[:, :, 3:4].astype(np.uint16)
        blended = rows[:, :, :3] * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127
        out[top : top + ALPHA_ROWS] = blended // 255
    return out


def encode(image: np.ndarray, image_format: str, quality: int) -> bytes:
    """Encode BGR pixels as jpeg, png or webp; quality is 1-100 (png maps it to compression)."""
    extension, _ = ENCODINGS[image_format]
    if image_format == "jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif image_format == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, encoded = cv2.imencode(extension, image, params)
    if not ok:
        raise ImageDecodeError(f"could not encode a {image.shape} image as {image_format}")
    return encoded.tobytes()


def sniff_format(data: bytes) -> str:
    """The format of encoded bytes by magic number, defaulting to jpeg."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpeg"
