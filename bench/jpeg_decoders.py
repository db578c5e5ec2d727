"""JPEG decoders side by side on photographs, to 224x224: Quarry's decode in full and at the
reduced scale it picks (common.images.decode: OpenCV), and libjpeg-turbo through simplejpeg at
the same scale, with and without its fast DCT and fast upsampling. One thread, raws in memory;
PSNR against the full decode.

simplejpeg is not a Quarry dependency: `pip install simplejpeg` beside the bench extra to run this.
Run: python -m bench.jpeg_decoders [--counts 1024=100 3000=30] [--passes 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from functools import partial

import cv2
import numpy as np

from bench.photographs import counts_by_side, jpeg_photographs
from common.augment.sizing import with_margin
from common.image_header import read_header
from common.images import decode, decode_scale

OUTPUT = (224, 224)
Decoder = Callable[[bytes], np.ndarray]


def turbo_reduced(floor: tuple[int, int], fast: bool) -> Decoder:
    """simplejpeg scales only when given a minimum size: the floor, which gives the scale
    Quarry picks (checked in main)."""
    import simplejpeg

    return partial(
        simplejpeg.decode_jpeg,
        colorspace="BGR",
        fastdct=fast,
        fastupsample=fast,
        min_width=floor[0],
        min_height=floor[1],
    )


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", nargs="*", default=["1024=100", "3000=30"])
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
    for side, count in counts_by_side(args.counts).items():
        images = list(jpeg_photographs(side, count))
        scale = decode_scale(read_header(images[0]), floor)
        full = decode
        reduced = {
            f"quarry (opencv), 1/{scale}": partial(decode, floor=floor),
            f"simplejpeg, 1/{scale}": turbo_reduced(floor, fast=False),
            f"simplejpeg, 1/{scale}, fast DCT+upsample": turbo_reduced(floor, fast=True),
        }
        shapes = {name: decoder(images[0]).shape for name, decoder in reduced.items()}
        if len(set(shapes.values())) != 1:
            raise SystemExit(f"the reduced decoders disagree on the size at {side} pixels: {shapes}")
        references = [rendered(full, data) for data in images]
        full_rate = best_rate(full, images, args.passes)
        print(f"{side:>9} {1:>5} {'quarry (opencv), full decode':<32} {full_rate:>8.1f} {1:>7.2f}x {'-':>8}")
        for name, decoder in reduced.items():
            rate = best_rate(decoder, images, args.passes)
            quality = min(
                cv2.PSNR(ref, rendered(decoder, data)) for ref, data in zip(references, images, strict=True)
            )
            print(f"{side:>9} {scale:>5} {name:<32} {rate:>8.1f} {rate / full_rate:>7.2f}x {quality:>8.1f}")


if __name__ == "__main__":
    main()
