"""JPEG decoders side by side on photographs, to 224x224: OpenCV in full, OpenCV at the reduced
scale Quarry picks, and libjpeg-turbo through simplejpeg at the same scale, with and without its
fast DCT and fast upsampling. One thread, raws in memory; PSNR against OpenCV's full decode.

simplejpeg is not a Quarry dependency: `pip install simplejpeg` beside the bench extra to run this.
Run: python -m bench.jpeg_decoders [--counts 1024=100,3000=30] [--passes 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import cv2
import numpy as np

from bench.photographs import jpeg_photographs
from common.augment.sizing import with_margin
from common.image_header import read_header
from common.images import REDUCED_READS, decode_scale

OUTPUT = (224, 224)
Decoder = Callable[[bytes], np.ndarray]


def opencv_full(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def opencv_reduced(scale: int) -> Decoder:
    flag = REDUCED_READS[scale] if scale > 1 else cv2.IMREAD_COLOR
    return lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), flag)


def turbo_reduced(scale: int, floor: tuple[int, int], fast: bool) -> Decoder:
    """simplejpeg scales only with a minimum size given: the floor, at no less than `scale`."""
    import simplejpeg

    def decode(data: bytes) -> np.ndarray:
        return simplejpeg.decode_jpeg(
            data,
            colorspace="BGR",
            fastdct=fast,
            fastupsample=fast,
            min_width=floor[0],
            min_height=floor[1],
            min_factor=scale,
        )

    return decode


def rendered(decoder: Decoder, data: bytes) -> np.ndarray:
    return cv2.resize(decoder(data), OUTPUT, interpolation=cv2.INTER_AREA)


def best_rate(decoder: Decoder, images: list[bytes], passes: int) -> float:
    best = 0.0
    for _ in range(passes):
        started = time.perf_counter()
        for data in images:
            rendered(decoder, data)
        best = max(best, len(images) / (time.perf_counter() - started))
    return best


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    error = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


def parse_counts(text: str) -> dict[int, int]:
    pairs = (item.split("=") for item in text.split(","))
    return {int(side): int(count) for side, count in pairs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=parse_counts, default=parse_counts("1024=100,3000=30"))
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    try:
        import simplejpeg  # noqa: F401
    except ImportError as missing:
        raise SystemExit(
            "bench.jpeg_decoders needs simplejpeg, not a Quarry dependency: pip install simplejpeg"
        ) from missing
    cv2.setNumThreads(1)
    floor = with_margin(OUTPUT)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one thread")
    print(f"{'long side':>9} {'scale':>5} {'decoder':<32} {'img/s':>8} {'vs full':>8} {'PSNR dB':>8}")
    for side, count in args.counts.items():
        images = list(jpeg_photographs(side, count))
        scale = decode_scale(read_header(images[0]), floor)
        decoders = {
            "opencv, full decode": opencv_full,
            f"opencv, 1/{scale}": opencv_reduced(scale),
            f"simplejpeg, 1/{scale}": turbo_reduced(scale, floor, fast=False),
            f"simplejpeg, 1/{scale}, fast DCT+upsample": turbo_reduced(scale, floor, fast=True),
        }
        shapes = {
            name: decoder(images[0]).shape
            for name, decoder in decoders.items()
            if name != "opencv, full decode"
        }
        if len(set(shapes.values())) != 1:
            raise SystemExit(f"the reduced decoders disagree on the size at {side} pixels: {shapes}")
        references = [rendered(opencv_full, data) for data in images]
        full_rate = 0.0
        for name, decoder in decoders.items():
            rate = best_rate(decoder, images, args.passes)
            full_rate = full_rate or rate
            quality = min(
                psnr(ref, rendered(decoder, data)) for ref, data in zip(references, images, strict=True)
            )
            print(f"{side:>9} {scale:>5} {name:<32} {rate:>8.1f} {rate / full_rate:>7.2f}x {quality:>8.1f}")


if __name__ == "__main__":
    main()
