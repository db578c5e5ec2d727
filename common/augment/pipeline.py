"""Applying normalised stages, deterministically for a given seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.augment.registry import Image, OpFunction, lookup

SEED_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Stage:
    """One op ready to run."""

    function: OpFunction
    probability: float
    arguments: dict[str, Any]


class Pipeline:
    """A sequence of stages; `apply` is a pure function of (image, seed)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    @classmethod
    def from_spec(cls, stages: Sequence[dict[str, Any]]) -> Pipeline:
        """Build from normalised stages (as `parse_spec` returns and messages carry)."""
        return cls([Stage(lookup(stage["op"]).function, stage["p"], stage["args"]) for stage in stages])

    def apply(self, image: Image, seed: Sequence[int]) -> Image:
        """Run every stage; the random draws depend only on `seed`, e.g. (job seed, id, variant)."""
        rng = np.random.default_rng([value & SEED_MASK for value in seed])
        for stage in self.stages:
            if stage.probability < 1.0 and rng.random() >= stage.probability:
                continue
            image = stage.function(image, rng, **stage.arguments)
        return np.ascontiguousarray(image)
