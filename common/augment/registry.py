"""The table of augmentation ops and the declared parameters each one takes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import SpecError

Image = np.ndarray
OpFunction = Callable[..., Image]  # (image, rng, **params) -> image

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """One op argument: its type, default and allowed values.

    `kind` is "float", "int", "str", "bool", "float_pair" or "int_pair".
    """

    kind: str
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, op: str, name: str, value: Any) -> Any:
        """The value converted to this param's kind; SpecError naming op and argument if not."""
        if self.kind.endswith("_pair"):
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = (value, value)
            if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
                raise SpecError(f"{op}: argument '{name}' must be a number or a pair (low, high)")
            scalar = Param(self.kind.removesuffix("_pair"), low=self.low, high=self.high)
            low, high = (scalar.check(op, name, item) for item in value)
            if low > high:
                raise SpecError(f"{op}: argument '{name}' has low {low} above high {high}")
            return [low, high]
        if self.kind == "str":
            if value not in self.choices:
                raise SpecError(
                    f"{op}: argument '{name}' must be one of {', '.join(self.choices)}; got {value!r}"
                )
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise SpecError(f"{op}: argument '{name}' must be true or false; got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{op}: argument '{name}' must be a number; got {value!r}")
        if self.kind == "int":
            if value != int(value):
                raise SpecError(f"{op}: argument '{name}' must be a whole number; got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise SpecError(f"{op}: argument '{name}' must be in [{self.low}, {self.high}]; got {value}")
        return value


Size = tuple[int, int]  # width, height
Needs = Callable[[dict[str, Any]], Size]  # (normalised arguments) -> the size an op makes


@dataclass(frozen=True)
class OpDef:
    """A registered op: its function and parameters, in positional order, and how it relates to
    the scale an image is decoded at (common/augment/sizing.py): `scale_free` when running it on
    a smaller decode gives a smaller copy of its output (flips, turns, colour, holes sized as a
    fraction), `makes_size` when it sets the output's size from its arguments (with what each
    side must keep at least for the output to be made by shrinking). An op with neither (pixel-
    sized kernels, noise, crops in source pixels) needs the image at full size."""

    name: str
    function: OpFunction
    params: dict[str, Param] = field(default_factory=dict)
    scale_free: bool = False
    makes_size: Needs | None = None


OPS: dict[str, OpDef] = {}


def register(
    name: str, *, scale_free: bool = False, makes_size: Needs | None = None, **params: Param
) -> Callable[[OpFunction], OpFunction]:
    """Register `function(image, rng, **params)` as op `name`; params in positional order."""

    def decorator(function: OpFunction) -> OpFunction:
        OPS[name] = OpDef(name, function, params, scale_free, makes_size)
        return function

    return decorator


def lookup(name: str) -> OpDef:
    """The op of that name; SpecError listing the known ones if there is none."""
    if name not in OPS:
        raise SpecError(f"unknown op '{name}'; known ops: {', '.join(sorted(OPS))}")
    return OPS[name]
