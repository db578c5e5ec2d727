from pathlib import Path

import cv2
import numpy as np
import pytest

from common.errors import ImageDecodeError
from common.images import decode, encode


def test_grayscale_becomes_three_channels() -> None:
    gray = np.full((10, 8), 77, dtype=np.uint8)
    image = decode(encode(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), "png", 0))
    _ok, png = cv2.imencode(".png", gray)
    image = decode(png.tobytes())
    assert image.shape == (10, 8, 3)
    assert (image == 77).all()


def test_png_alpha_is_composited_on_white() -> None:
    bgra = np.zeros((4, 4, 4), dtype=np.uint8)
    bgra[..., 2] = 255  # red, fully transparent on the left half
    bgra[:, 2:, 3] = 255
    _ok, png = cv2.imencode(".png", bgra)
    image = decode(png.tobytes())
    assert image[0, 0].tolist() == [255, 255, 255]
    assert image[0, 3].tolist() == [0, 0, 255]


def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    deep = np.full((3, 3, 3), 65535, dtype=np.uint16)
    _ok, png = cv2.imencode(".png", deep)
    assert decode(png.tobytes()).dtype == np.uint8


def test_exif_orientation_is_applied() -> None:
    # A 2x4 (HxW) JPEG tagged "rotate 90 CW" must come out 4x2.
    _ok, jpeg = cv2.imencode(".jpg", np.zeros((2, 4, 3), dtype=np.uint8))
    body = jpeg.tobytes()
    tiff = (
        b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
    )
    app1 = b"\xff\xe1" + (len(tiff) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + tiff
    rotated = decode(body[:2] + app1 + body[2:])
    assert rotated.shape[:2] == (4, 2)


@pytest.mark.parametrize(("data", "message"), [(b"", "empty"), (b"\xff\xd8 not a jpeg", "not a decodable")])
def test_bad_bytes_raise_a_permanent_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode(data)


@pytest.mark.parametrize("image_format", ["jpeg", "png", "webp"])
def test_encode_round_trips(image_format: str) -> None:
    image = np.random.default_rng(0).integers(0, 255, (16, 12, 3), dtype=np.uint8)
    assert decode(encode(image, image_format, 95)).shape == image.shape


def test_cmyk_jpeg_becomes_bgr() -> None:
    # tests/fixtures/red-cmyk.jpg: a 6x4 CMYK JPEG of pure red (C=0, M=255, Y=255, K=0), made by Pillow.
    image = decode((Path(__file__).parent.parent / "fixtures" / "red-cmyk.jpg").read_bytes())
    assert image.shape == (4, 6, 3)
    blue, green, red = image[2, 3].tolist()
    assert red > 200 and green < 60 and blue < 60
