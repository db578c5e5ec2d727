"""Declarative, deterministic OpenCV augmentation: parse a spec once, apply it anywhere."""

from common.augment.pipeline import Pipeline
from common.augment.spec import AugmentSpec, format_spec, parse_spec

__all__ = ["AugmentSpec", "Pipeline", "format_spec", "parse_spec"]
