"""Decoding no larger than needed: headers read without decoding, the floor a spec needs, the
libjpeg scale chosen, and outputs that stay the same bytes run to run and close to a full
decode's. Photographs here are mosaics of the vendored sample's real photographs at their native
resolution (never upscaled)."""

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
from tests.photographs import jpeg, mosaic

PIPELINE = "hflip | rotate(limit=15) | resize(224, 224)"
EXIF_TURNED = (
    b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
)


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
        (PIPELINE, (336, 336)),
        ("resize(300, 100, keep_aspect=True)", (450, 150)),
        ("brightness_contrast | cutout | resize(64, 33)", (96, 50)),
        ("random_resized_crop(224, 224)", (1373, 1373)),
        ("resize(224, 224, p=0.5)", None),  # may leave the image at its full size
        ("gaussian_blur | resize(224, 224)", None),  # a kernel in source pixels
        ("crop(224, 224) | resize(112, 112)", None),  # a window in source pixels
        ("hflip", None),  # no op sets a size: the output is as large as the source
    ],
)
def test_the_floor_is_one_and_a_half_times_what_the_first_size_setting_op_keeps(
    spec: str, floor: tuple[int, int] | None
) -> None:
    assert decode_floor(parse_spec(spec).stages) == floor


def test_exact_decode_has_no_floor() -> None:
    assert spec_floor(parse_spec(PIPELINE).stages, exact=True) is None
    assert spec_floor(parse_spec(PIPELINE).stages, exact=False) == [336, 336]


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


def job(spec: str, exact: bool = False, image_format: str | None = None) -> JobSpec:
    stages = parse_spec(spec).stages
    floor = spec_floor(stages, exact)
    return JobSpec(
        job_id="j", variants=3, seed=5, augment=stages, decode_floor=floor, image_format=image_format
    )


def psnr(first: bytes, second: bytes) -> float:
    decoded = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in (first, second)]
    return float(cv2.PSNR(*decoded))


@pytest.mark.parametrize(("width", "height"), [(2400, 1600), (1024, 683)])
def test_reduced_decode_outputs_are_the_same_bytes_every_run_and_close_to_a_full_decode(
    width: int, height: int
) -> None:
    """Rendered pixels (PNG output: the output encoding's own loss left out) close to a full
    decode's. A collage of 60x80 thumbnails is the worst case there is: every output pixel
    spans edges of several photographs, so a turn on the smaller decode shows most; it stays
    above 30 dB here, and photographs above 35 dB (bench/photographs.py, docs/benchmarks.md)."""
    data = jpeg(mosaic(width, height))
    reduced = render(job(PIPELINE, image_format="png"), data)
    again = render(job(PIPELINE, image_format="png"), data)
    full = render(job(PIPELINE, exact=True, image_format="png"), data)
    assert reduced == again
    assert reduced != full  # decoded at 1/4 or 1/2: not the full decode's pixels ...
    assert min(psnr(r, f) for r, f in zip(reduced, full, strict=True)) >= 30  # ... but close to them


def test_a_spec_whose_output_is_larger_than_the_source_decodes_in_full() -> None:
    data = jpeg(mosaic(600, 400))
    spec = "hflip | resize(800, 800)"
    assert render(job(spec), data) == render(job(spec, exact=True), data)


def test_the_model_reads_jpegs_no_larger_than_its_input_needs() -> None:
    """The default classifier takes 60x80 (width x height): a 3,000x2,000 JPEG is decoded at
    1/8 (375x250 keeps 1.5 times that), unless the job asked for an exact decode."""
    from common.inference import model_decoder
    from common.model import Classifier
    from common.paths import MODELS_DIR

    classifier = Classifier(MODELS_DIR / "fashion-classifier.onnx")
    preprocess = classifier.info.preprocess
    data = jpeg(mosaic(3000, 2000))
    reduced = model_decoder(classifier, exact=False, max_pixels=10**8)(data)
    full = model_decoder(classifier, exact=True, max_pixels=10**8)(data)
    assert (preprocess.width, preprocess.height) == (60, 80)
    assert reduced.shape == (250, 375, 3) and full.shape == (2000, 3000, 3)
