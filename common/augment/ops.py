"""The augmentation ops. Each takes an HxWx3 uint8 BGR image and a seeded numpy Generator.

Adding an op is one function here plus its `@register` line.
"""

from __future__ import annotations

import math

import numpy as np

from common.augment.registry import Image, Param, register
from common.opencv import cv2

BORDERS = {
    "reflect": cv2.BORDER_REFLECT_101,
    "constant": cv2.BORDER_CONSTANT,
    "replicate": cv2.BORDER_REPLICATE,
}
FILL = Param("int", 0, 0, 255)


def interpolation(source: tuple[int, int], target: tuple[int, int]) -> int:
    """INTER_AREA when shrinking, INTER_LINEAR when enlarging."""
    return cv2.INTER_AREA if target[0] * target[1] < source[0] * source[1] else cv2.INTER_LINEAR


def crop_window_floor(width: int, height: int, scale: list[float], ratio: list[float]) -> tuple[int, int]:
    """The short side an image must keep for random_resized_crop's smallest window (area
    fraction scale[0], at either end of `ratio`) to still hold width x height pixels."""
    side = max(width / math.sqrt(scale[0] * ratio[0]), height * math.sqrt(ratio[1] / scale[0]))
    return math.ceil(side), math.ceil(side)


@register("hflip", scale_free=True)
def hflip(image: Image, rng: np.random.Generator) -> Image:
    return cv2.flip(image, 1)


@register("vflip", scale_free=True)
def vflip(image: Image, rng: np.random.Generator) -> Image:
    return cv2.flip(image, 0)


@register(
    "rotate",
    scale_free=True,
    limit=Param("float", 15.0, 0, 180),
    border=Param("str", "reflect", choices=tuple(BORDERS)),
    fill=FILL,
)
def rotate(image: Image, rng: np.random.Generator, limit: float, border: str, fill: int) -> Image:
    """Rotate about the centre by an angle drawn from [-limit, limit] degrees, same size."""
    angle = rng.uniform(-limit, limit)
    if angle == 0:
        return image
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
    return cv2.warpAffine(
        image,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=BORDERS[border],
        borderValue=(fill, fill, fill),
    )


@register(
    "crop",
    width=Param("int", low=1, high=16384),
    height=Param("int", low=1, high=16384),
    position=Param("str", "center", choices=("center", "random")),
)
def crop(image: Image, rng: np.random.Generator, width: int, height: int, position: str) -> Image:
    """A width x height window (clipped to the image), centred or at a random place."""
    image_height, image_width = image.shape[:2]
    width, height = min(width, image_width), min(height, image_height)
    if position == "center":
        left, top = (image_width - width) // 2, (image_height - height) // 2
    else:
        left = int(rng.integers(0, image_width - width + 1))
        top = int(rng.integers(0, image_height - height + 1))
    return image[top : top + height, left : left + width].copy()


@register(
    "random_resized_crop",
    makes_size=lambda args: crop_window_floor(args["width"], args["height"], args["scale"], args["ratio"]),
    width=Param("int", low=1, high=16384),
    height=Param("int", low=1, high=16384),
    scale=Param("float_pair", (0.08, 1.0), 0.001, 1.0),
    ratio=Param("float_pair", (0.75, 4 / 3), 0.05, 20.0),
)
def random_resized_crop(
    image: Image,
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: list[float],
    ratio: list[float],
) -> Image:
    """A random area fraction `scale` with aspect `ratio` of the image, resized to width x height."""
    image_height, image_width = image.shape[:2]
    area = image_height * image_width
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= image_width and 0 < crop_height <= image_height:
            left = int(rng.integers(0, image_width - crop_width + 1))
            top = int(rng.integers(0, image_height - crop_height + 1))
            break
    else:  # fall back to the whole image, as torchvision does
        crop_width, crop_height, left, top = image_width, image_height, 0, 0
    window = image[top : top + crop_height, left : left + crop_width]
    return cv2.resize(window, (width, height), interpolation=interpolation(window.shape[:2], (height, width)))


@register(
    "resize",
    makes_size=lambda args: (args["width"], args["height"]),
    width=Param("int", low=1, high=16384),
    height=Param("int", low=1, high=16384),
    keep_aspect=Param("bool", False),
    fill=FILL,
)
def resize(
    image: Image, rng: np.random.Generator, width: int, height: int, keep_aspect: bool, fill: int
) -> Image:
    """Exactly width x height, or scaled to fit inside it and padded with `fill`."""
    image_height, image_width = image.shape[:2]
    if not keep_aspect:
        method = interpolation((image_height, image_width), (height, width))
        return cv2.resize(image, (width, height), interpolation=method)
    factor = min(width / image_width, height / image_height)
    new_width = max(1, round(image_width * factor))
    new_height = max(1, round(image_height * factor))
    method = interpolation((image_height, image_width), (new_height, new_width))
    scaled = cv2.resize(image, (new_width, new_height), interpolation=method)
    top, left = (height - new_height) // 2, (width - new_width) // 2
    return cv2.copyMakeBorder(
        scaled,
        top,
        height - new_height - top,
        left,
        width - new_width - left,
        cv2.BORDER_CONSTANT,
        value=(fill, fill, fill),
    )


@register(
    "brightness_contrast",
    scale_free=True,
    brightness=Param("float", 0.2, 0, 1),
    contrast=Param("float", 0.2, 0, 1),
)
def brightness_contrast(image: Image, rng: np.random.Generator, brightness: float, contrast: float) -> Image:
    """Multiply by 1 ± contrast and add ± brightness x 255, each drawn uniformly."""
    alpha = 1.0 + rng.uniform(-contrast, contrast)
    beta = 255.0 * rng.uniform(-brightness, brightness)
    table = np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).round()
    return cv2.LUT(image, table.astype(np.uint8))


@register(
    "hsv_shift",
    scale_free=True,
    hue=Param("float", 10.0, 0, 90),
    saturation=Param("float", 20.0, 0, 255),
    value=Param("float", 20.0, 0, 255),
)
def hsv_shift(image: Image, rng: np.random.Generator, hue: float, saturation: float, value: float) -> Image:
    """Shift hue (OpenCV's 0-179 scale, wrapping), saturation and value by drawn amounts."""
    hue_shift = round(rng.uniform(-hue, hue))
    saturation_shift = rng.uniform(-saturation, saturation)
    value_shift = rng.uniform(-value, value)
    levels = np.arange(256, dtype=np.float32)
    hue_table = ((levels + hue_shift) % 180).astype(np.uint8)
    saturation_table = np.clip(levels + saturation_shift, 0, 255).round().astype(np.uint8)
    value_table = np.clip(levels + value_shift, 0, 255).round().astype(np.uint8)
    channels = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    shifted = cv2.merge(
        [
            cv2.LUT(channels[0], hue_table),
            cv2.LUT(channels[1], saturation_table),
            cv2.LUT(channels[2], value_table),
        ]
    )
    return cv2.cvtColor(shifted, cv2.COLOR_HSV2BGR)


@register(
    "gaussian_blur",
    kernel=Param("int_pair", (3, 7), 1, 99),
    sigma=Param("float_pair", (0.0, 0.0), 0, 50),
)
def gaussian_blur(image: Image, rng: np.random.Generator, kernel: list[int], sigma: list[float]) -> Image:
    """Blur with an odd kernel size drawn from `kernel` (sigma 0 = derived from the size)."""
    odd_sizes = [size for size in range(kernel[0], kernel[1] + 1) if size % 2 == 1] or [kernel[1] | 1]
    size = int(odd_sizes[int(rng.integers(0, len(odd_sizes)))])
    return cv2.GaussianBlur(image, (size, size), rng.uniform(sigma[0], sigma[1]))


@register("gaussian_noise", std=Param("float_pair", (0.01, 0.05), 0, 1))
def gaussian_noise(image: Image, rng: np.random.Generator, std: list[float]) -> Image:
    """Add noise with a standard deviation drawn from `std` (as a fraction of 255)."""
    sigma = 255.0 * rng.uniform(std[0], std[1])
    noise = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    return cv2.add(image, noise, dtype=cv2.CV_8U)


@register(
    "cutout",
    scale_free=True,
    holes=Param("int", 4, 1, 100),
    size=Param("float", 0.1, 0.001, 1),
    fill=FILL,
)
def cutout(image: Image, rng: np.random.Generator, holes: int, size: float, fill: int) -> Image:
    """Fill `holes` squares of side `size` x the shorter edge at random places."""
    height, width = image.shape[:2]
    side = max(1, round(size * min(height, width)))
    out = image.copy()
    for _ in range(holes):
        top = int(rng.integers(0, max(1, height - side + 1)))
        left = int(rng.integers(0, max(1, width - side + 1)))
        out[top : top + side, left : left + side] = fill
    return out


@register("grayscale", scale_free=True)
def grayscale(image: Image, rng: np.random.Generator) -> Image:
    """Luma, kept as three equal channels."""
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


@register("jpeg", quality=Param("int_pair", (50, 95), 1, 100))
def jpeg(image: Image, rng: np.random.Generator, quality: list[int]) -> Image:
    """Round-trip through JPEG at a quality drawn from `quality` (compression artefacts)."""
    level = int(rng.integers(quality[0], quality[1] + 1))
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, level])
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR) if ok else None
    return image if decoded is None else decoded
