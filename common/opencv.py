"""OpenCV, loaded with its decoders' own pixel limit set from IMAGE_MAX_PIXELS.

OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when it loads, and then refuses to decode any
image whose header declares more pixels, whatever its format (TIFF, BMP, PNM, ... as well as
those common/image_header.py reads). Every module of Quarry's imports cv2 from here, so the
limit is in place before the first decode in every Quarry process. Where something else loaded
OpenCV first (a notebook that imported cv2 itself), the limit cannot be set: LIMIT_IN_FORCE is
False and common/images.py refuses an image whose size it cannot read from the header.
"""

from __future__ import annotations

import os
import sys

from common.config import Settings, get_settings
from common.errors import ConfigError


def pixel_limit() -> int:
    """IMAGE_MAX_PIXELS, or its default where the settings cannot be read (the command that
    needs them says why)."""
    try:
        return get_settings().image_max_pixels
    except ConfigError:
        return int(Settings.model_fields["image_max_pixels"].default)


PIXEL_LIMIT = pixel_limit()
LIMIT_IN_FORCE = "cv2" not in sys.modules
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(PIXEL_LIMIT)

import cv2  # noqa: E402  (after the limit: OpenCV reads it when it loads)

LIMIT_REFUSAL = "CV_IO_MAX_IMAGE_PIXELS"  # in the cv2.error of an image past the limit

__all__ = ["LIMIT_IN_FORCE", "LIMIT_REFUSAL", "PIXEL_LIMIT", "cv2"]
