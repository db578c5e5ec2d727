"""Decoding no larger than needed: headers read without decoding, the floor a spec needs, the
libjpeg scale chosen, and outputs that stay the same bytes run to run and close to a full
decode's. Photographs here are mosaics of the vendored sample's real photographs at their native
resolution (never upscaled)."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from common.augment import parse_spec
from common.augment.sizing import decode_floor, spec_floor
from common.datasets import Location
from common.image_header import Header, read_header
from common.images import decode, decode_scale
from common.jobspec import JobSpec
from common.sources import Source
from common.transform import merged, transform_images

SAMPLE_IMAGES = sorted((Path(__file__).resolve().parents[2] / "data" / "sample" / "images").glob("*.jpg"))
PIPELINE = "hflip | rotate(limit=15) | resize(224, 224)"
EXIF_TURNED = (
    b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
)


def mosaic(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Real photographs tiled at their native size (the sample's 60x80 product shots)."""
    rng = np.random.default_rng(seed)
    tiles = [cv2.imread(str(path)) for path in rng.choice(SAMPLE_IMAGES, 64)]  # type: ignore[arg-type]
    tile_height, tile_width = 80, 60
    rows = []
    for row in range(-(-height // tile_height)):
        picks = [tiles[(row * 7 + column) % len(tiles)] for column in range(-(-width // tile_width))]
        rows.append(
            np.hstack([cv2.copyMakeBorder(t, 0, 80 - t.shape[0], 0, 60 - t.shape[1], 0) for t in picks])
        )
    return np.ascontiguousarray(np.vstack(rows)[:height, :width])


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


@pytest.mark.parametrize("extension", [".jpg", ".png", ".webp"])
def test_a_header_gives_the_size_a_decode_gives(extension: str) -> None:
    image = mosaic(301, 177)
    for params in ([], [cv2.IMWRITE_WEBP_QUALITY, 101]) if extension == ".webp" else ([],):
        data = cv2.imencode(extension, image, params)[1].tobytes()
        header = read_header(data)
        assert header is not None and (header.width, header.height) == (301, 177)


def test_a_quarter_turn_in_exif_swaps_the_header_size() -> None:
    body = jpeg(mosaic(40, 20))
    app1 = b"\xff\xe1" + (len(EXIF_TURNED) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + EXIF_TURNED
    turned = body[:2] + app1 + body[2:]
    assert read_header(turned) == Header("jpeg", 20, 40)
    assert decode(turned).shape[:2] == (40, 20)


def test_unreadable_headers_leave_the_decoder_the_last_word() -> None:
    assert read_header(b"GIF89a....") is None
    assert read_header(b"\xff\xd8\x00garbage") is None
    assert read_header(b"\xff\xd8") is None


@pytest.mark.parametrize(
    ("spec", "floor"),
    [
        (PIPELINE, (448, 448)),
        ("resize(300, 100, keep_aspect=True)", (600, 200)),
        ("brightness_contrast | cutout | resize(64, 32)", (128, 64)),
        ("random_resized_crop(224, 224)", (1830, 1830)),
        ("resize(224, 224, p=0.5)", None),  # may leave the image at its full size
        ("gaussian_blur | resize(224, 224)", None),  # a kernel in source pixels
        ("crop(224, 224) | resize(112, 112)", None),  # a window in source pixels
        ("hflip", None),  # no op sets a size: the output is as large as the source
    ],
)
def test_the_floor_is_twice_what_the_first_size_setting_op_keeps(
    spec: str, floor: tuple[int, int] | None
) -> None:
    assert decode_floor(parse_spec(spec).stages) == floor


def test_exact_decode_has_no_floor() -> None:
    assert spec_floor(parse_spec(PIPELINE).stages, exact=True) is None
    assert spec_floor(parse_spec(PIPELINE).stages, exact=False) == [448, 448]


@pytest.mark.parametrize(
    ("size", "scale"),
    [((3000, 2000), 4), ((1024, 683), 1), ((3585, 3585), 8), ((1792, 1000), 2), ((256, 171), 1)],
)
def test_the_largest_libjpeg_scale_that_keeps_the_floor(size: tuple[int, int], scale: int) -> None:
    assert decode_scale(Header("jpeg", *size), (448, 448)) == scale
    assert decode_scale(Header("png", *size), (448, 448)) == 1  # only JPEGs decode smaller
    assert decode_scale(Header("jpeg", *size), None) == 1


def test_a_reduced_decode_is_that_scale_of_the_image() -> None:
    data = jpeg(mosaic(1800, 1000))
    assert decode(data, (448, 448)).shape == (500, 900, 3)  # 1/2: 1/4 would leave 250 rows
    assert decode(data, (100, 100)).shape == (125, 225, 3)  # 1/8
    assert decode(data).shape == (1000, 1800, 3)


def render(spec: JobSpec, data: bytes) -> list[bytes]:
    index = {7: Location(Source("s3://raw/7.jpg"))}
    groups = transform_images(
        spec, [7], index, lambda s: dict.fromkeys(s, (data, '"e"')), bytes_in_flight=1 << 26, max_pixels=10**8
    )
    return [output.data for output in merged(groups).outputs]


def job(spec: str, exact: bool = False) -> JobSpec:
    stages = parse_spec(spec).stages
    return JobSpec(job_id="j", variants=3, seed=5, augment=stages, decode_floor=spec_floor(stages, exact))


def psnr(first: bytes, second: bytes) -> float:
    decoded = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in (first, second)]
    return float(cv2.PSNR(*decoded))


def test_reduced_decode_outputs_are_the_same_bytes_every_run_and_close_to_a_full_decode() -> None:
    data = jpeg(mosaic(2400, 1600))
    reduced, again, full = (
        render(job(PIPELINE), data),
        render(job(PIPELINE), data),
        render(job(PIPELINE, True), data),
    )
    assert reduced == again
    assert reduced != full  # decoded at 1/2: not the full decode's pixels ...
    assert min(psnr(r, f) for r, f in zip(reduced, full, strict=True)) >= 35  # ... but close to them


def test_a_spec_whose_output_is_larger_than_the_source_decodes_in_full() -> None:
    data = jpeg(mosaic(600, 400))
    spec = "hflip | resize(800, 800)"
    assert render(job(spec), data) == render(job(spec, exact=True), data)
