"""Altered copies of an image, as near-duplicates arise in the wild (the duplicates tests and
bench/duplicates.py): re-encoded at low JPEG quality, shrunk and enlarged again, cropped by a few
percent on each side, brightness and contrast shifted."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.opencv import cv2


def jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    def alter(image: np.ndarray) -> np.ndarray:
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        return cv2.imdecode(data, cv2.IMREAD_COLOR)

    return alter


def rescaled(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    def alter(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        small = cv2.resize(image, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)

    return alter


def cropped(fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    def alter(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        dy, dx = round(height * fraction), round(width * fraction)
        return np.ascontiguousarray(image[dy : height - dy, dx : width - dx])

    return alter


def shifted(contrast: float, brightness: float) -> Callable[[np.ndarray], np.ndarray]:
    def alter(image: np.ndarray) -> np.ndarray:
        return cv2.convertScaleAbs(image, alpha=contrast, beta=brightness)

    return alter


# each kind the issue names, at the strength a test must survive
ALTERATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jpeg_q20": jpeg(20),
    "shrunk_half_enlarged": rescaled(0.5),
    "cropped_4pct": cropped(0.04),
    "brightness_contrast": shifted(1.25, -25),
}


def encoded(image: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()
