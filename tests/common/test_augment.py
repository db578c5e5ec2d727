import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from common.augment import Pipeline, format_spec, parse_spec
from common.augment.registry import OPS
from common.errors import SpecError

RNG = np.random.default_rng(1)
IMAGE = RNG.integers(0, 256, (80, 60, 3), dtype=np.uint8)
TINY = RNG.integers(0, 256, (1, 1, 3), dtype=np.uint8)
DEFAULT_ARGS = {
    "crop": "crop(20, 30)",
    "random_resized_crop": "random_resized_crop(32, 24)",
    "resize": "resize(24, 32)",
}


def run(spec: str, image: np.ndarray = IMAGE, seed: tuple[int, ...] = (0, 1, 0)) -> np.ndarray:
    return Pipeline.from_spec(parse_spec(spec).stages).apply(image, seed)


def test_hflip_twice_is_the_identity() -> None:
    assert np.array_equal(run("hflip | hflip"), IMAGE)
    assert not np.array_equal(run("hflip"), IMAGE)


def test_rotate_by_zero_is_the_identity() -> None:
    assert np.array_equal(run("rotate(limit=0)"), IMAGE)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("image", [IMAGE, TINY], ids=["60x80", "1x1"])
def test_every_op_keeps_dtype_channels_and_range(name: str, image: np.ndarray) -> None:
    out = run(DEFAULT_ARGS.get(name, name), image)
    assert out.dtype == np.uint8
    assert out.ndim == 3 and out.shape[2] == 3
    assert out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("name", sorted(OPS))
def test_p_zero_never_applies(name: str) -> None:
    spec = DEFAULT_ARGS.get(name, f"{name}()").replace(")", ", p=0)").replace("(, ", "(")
    for seed in range(20):
        assert np.array_equal(run(spec, seed=(seed, 1, 0)), IMAGE)


def test_resize_shapes() -> None:
    assert run("resize(224, 112)").shape == (112, 224, 3)
    padded = run("resize(100, 100, keep_aspect=True, fill=255)")
    assert padded.shape == (100, 100, 3)
    assert (padded[:, 0] == 255).all()  # the 60x80 image is letterboxed left and right


def test_grayscale_has_equal_channels() -> None:
    out = run("grayscale")
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    spec = "rotate(limit=30) | hsv_shift | gaussian_noise | cutout"
    assert np.array_equal(run(spec, seed=(5, 9, 1)), run(spec, seed=(5, 9, 1)))
    assert not np.array_equal(run(spec, seed=(5, 9, 1)), run(spec, seed=(5, 9, 2)))


def test_determinism_across_processes() -> None:
    spec = "hflip(p=0.5) | rotate(limit=15) | brightness_contrast(0.2, 0.2) | gaussian_noise | jpeg"
    program = (
        "import sys, hashlib, numpy as np\n"
        "from common.augment import Pipeline, parse_spec\n"
        "image = np.random.default_rng(1).integers(0, 256, (80, 60, 3), dtype=np.uint8)\n"
        f"out = Pipeline.from_spec(parse_spec({spec!r}).stages).apply(image, (3, 4, 5))\n"
        "print(hashlib.sha256(out.tobytes()).hexdigest())\n"
    )
    digests = {
        subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(digests) == 1
    import hashlib

    assert digests == {hashlib.sha256(run(spec, seed=(3, 4, 5)).tobytes()).hexdigest() + "\n"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("blurr(3)", "unknown op 'blurr'"),
        ("rotate(limit=200)", "rotate: argument 'limit' must be in [0, 180]"),
        ("rotate(angle=3)", "rotate: unknown argument 'angle'"),
        ("resize(224)", "resize: missing argument 'height'"),
        ("hflip(p=1.5)", "hflip: argument 'p' must be a probability"),
        ("rotate(border='wrap')", "rotate: argument 'border' must be one of"),
        ("crop(10, 10, 'center', 4)", "crop: takes 3 positional"),
        ("gaussian_blur(kernel=(7, 3))", "low 7 above high 3"),
        ("hflip | | vflip", "empty stage"),
        ("rotate(limit=__import__('os'))", "rotate: arguments must be"),
        ("resize(224.5, 10)", "whole number"),
    ],
)
def test_spec_errors_name_the_op_and_argument(spec: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_spec_file_matches_text(tmp_path: Path) -> None:
    text = "hflip(p=0.5) | rotate(limit=15) | resize(224, 224)"
    document = {
        "keep_original": True,
        "pipeline": [
            {"op": "hflip", "p": 0.5},
            "rotate(limit=15)",
            {"op": "resize", "width": 224, "height": 224},
        ],
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(document))
    from_file = parse_spec(str(path))
    assert from_file.stages == parse_spec(text).stages
    assert from_file.keep_original
    assert parse_spec(format_spec(from_file.stages)).stages == from_file.stages


def test_a_missing_spec_file_is_refused() -> None:
    with pytest.raises(SpecError, match="cannot read spec file"):
        parse_spec("/nonexistent/spec.yaml")


def test_threads_rendering_at_once_draw_what_each_draws_alone() -> None:
    """Each thread reseeds its own generator, so interleaved applies do not share draws."""
    spec = "hflip(p=0.5) | rotate(limit=30) | brightness_contrast(0.3, 0.3)"
    seeds = [(7, image_id, variant) for image_id in range(40) for variant in range(2)]
    alone = {seed: run(spec, seed=seed).tobytes() for seed in seeds}
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = dict(zip(seeds, pool.map(lambda seed: run(spec, seed=seed).tobytes(), seeds), strict=True))
    assert together == alone
    assert len(set(alone.values())) > len(seeds) // 2  # the seeds do draw differently
