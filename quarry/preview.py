"""`producer preview` and `Quarry.preview`: a labelled contact sheet of one image and its variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.augment import Pipeline
from common.errors import UserError
from common.images import decode
from common.jobspec import JobSpec
from common.opencv import cv2
from common.transform import render_variants

CELL_HEIGHT = 240
LABEL_HEIGHT = 28
MARGIN = 8


def contact_sheet(spec: JobSpec, image_id: int, data: bytes, max_pixels: int) -> np.ndarray:
    """The original and each variant, exactly as a job with this spec would render them."""
    pipeline = Pipeline.from_spec(spec.augment)
    tiles = [("original", decode(data, max_pixels=max_pixels))]
    variants = range(spec.variants)
    for output in render_variants(spec, pipeline, 0, image_id, variants, "preview", data, max_pixels):
        tiles.append((f"variant {output.variant}", decode(output.data)))
    cells = [label_tile(name, image) for name, image in tiles]
    height = max(cell.shape[0] for cell in cells)
    padded = [
        cv2.copyMakeBorder(
            cell, 0, height - cell.shape[0], MARGIN, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255)
        )
        for cell in cells
    ]
    sheet = np.hstack(padded)
    return cv2.copyMakeBorder(sheet, MARGIN, MARGIN, 0, MARGIN, cv2.BORDER_CONSTANT, value=(255, 255, 255))


def label_tile(label: str, image: np.ndarray) -> np.ndarray:
    """Scale an image to the cell height (nearest: pixels stay visible) and write its label."""
    factor = CELL_HEIGHT / image.shape[0]
    width = max(1, round(image.shape[1] * factor))
    scaled = cv2.resize(image, (width, CELL_HEIGHT), interpolation=cv2.INTER_NEAREST)
    width = max(width, 9 * len(label) + 8)
    cell = np.full((CELL_HEIGHT + LABEL_HEIGHT, width, 3), 255, dtype=np.uint8)
    cell[:CELL_HEIGHT, : scaled.shape[1]] = scaled
    cv2.putText(cell, label, (4, CELL_HEIGHT + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return cell


def read_dataset_image(dataset: Path, image_id: int) -> bytes:
    """An image's bytes from the dataset folder (`images/{id}.jpg`); UserError when missing."""
    source = dataset / "images" / f"{image_id}.jpg"
    if not source.is_file():
        raise UserError(f"no image {source}")
    return source.read_bytes()
