"""How large a JPEG must be decoded for a spec's output to be what a full decode would give.

libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT domain for a fraction of a full decode's
cost. A spec whose first size-setting op (resize, random_resized_crop) shrinks the image only
needs the pixels that op keeps, so the image may be decoded smaller when every op before it is
scale-free (a flip, a turn, a colour change: on a smaller image it gives a smaller copy of the
same output). DECODE_MARGIN keeps 1.5 times the pixels the op needs on each side: with 1x the
rendered outputs fell to 28-30 dB PSNR against a full decode's on photographs, with 1.5x they
stay above 35 dB, and 2x would decode 1,024-pixel photographs in full for a 224 output
(docs/decisions.md, "Decoding no larger than needed").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from common.augment.registry import Size, lookup

DECODE_MARGIN = 1.5


def decode_floor(stages: Sequence[dict[str, Any]]) -> Size | None:
    """The (width, height) a decoded image must keep at least for these normalised stages, or
    None when only a full decode gives their output: no op sets a size, an op before it works
    in source pixels, or the size-setting op may be skipped (p < 1)."""
    for stage in stages:
        op = lookup(stage["op"])
        if op.makes_size is not None:
            return with_margin(op.makes_size(stage["args"])) if stage["p"] == 1.0 else None
        if not op.scale_free:
            return None
    return None


def spec_floor(stages: Sequence[dict[str, Any]], exact: bool) -> list[int] | None:
    """`JobSpec.decode_floor` for these stages: [width, height], or None to decode in full."""
    floor = None if exact else decode_floor(stages)
    return list(floor) if floor else None


def with_margin(size: Size) -> Size:
    return math.ceil(size[0] * DECODE_MARGIN), math.ceil(size[1] * DECODE_MARGIN)
