from pathlib import Path

import cv2
import numpy as np
import pytest

from common.errors import ImageDecodeError, ImageTooLarge
from common.image_header import Header, read_header
from common.images import composite_alpha, decode, encode, imdecode
from tests.photographs import bmp_bomb, bomb, tiff_bomb, with_stray_byte


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


BOMBS = {
    "a JPEG with a stray byte before its frame": with_stray_byte(bomb()),
    "a TIFF": tiff_bomb(),
    "a BMP": bmp_bomb(),
}


@pytest.mark.parametrize("data", BOMBS.values(), ids=BOMBS.keys())
def test_no_bomb_is_decoded_whatever_its_format_or_header(data: bytes) -> None:
    """IMAGE_MAX_PIXELS holds for every format: from Quarry's header reader where it reads the
    size, and from OpenCV's own limit (set from the setting) in its reading of any header."""
    with pytest.raises(ImageTooLarge, match="image too large"):
        decode(data, max_pixels=100_000_000)
    with pytest.raises(ImageTooLarge, match="IMAGE_MAX_PIXELS, checked by OpenCV"):
        imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # the second wall alone


def test_a_stray_byte_between_segments_does_not_hide_a_jpegs_size() -> None:
    assert read_header(with_stray_byte(bomb(30_000, 20_000))) == Header("jpeg", 30_000, 20_000)
    small = with_stray_byte(cv2.imencode(".jpg", np.zeros((40, 30, 3), np.uint8))[1].tobytes())
    assert read_header(small) == Header("jpeg", 30, 40)
    assert decode(small).shape == (40, 30, 3)  # libjpeg skips the byte and decodes the frame


def test_alpha_is_composited_in_integers_as_the_float_blend_rounds() -> None:
    bgra = np.random.default_rng(7).integers(0, 256, (600, 300, 4), dtype=np.uint8)
    alpha = bgra[:, :, 3:4].astype(np.float64) / 255
    expected = np.round(bgra[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    assert np.array_equal(composite_alpha(bgra), expected)
