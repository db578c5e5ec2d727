"""Coalesced reads: the byte ranges of one object that a chunk needs, merged into few GETs.

Ranges of the same object whose hole (the unread bytes between them) is at most `hole` bytes are
merged, as long as the merged span stays at most `cap` bytes; when the spans together cover at
least `whole_fraction` of the object, the object is read whole in one GET. A range larger than
`cap` alone is read alone. So no read is longer than `cap` but a single range, and a sparse
selection never needs more than one GET per range. Objects named without a range are read
whole, one GET each.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.sources import Source


@dataclass(frozen=True)
class ReadPolicy:
    """How ranges are merged (settings READ_HOLE_BYTES, READ_SPAN_MAX_BYTES, READ_WHOLE_FRACTION)."""

    hole: int
    cap: int
    whole_fraction: float


@dataclass
class Read:
    """One GET: `length` bytes of `uri` from `start` (None: the whole object), and the sources
    whose bytes are inside it."""

    uri: str
    etag: str | None
    start: int | None
    length: int | None
    sources: list[Source] = field(default_factory=list)

    def slice_of(self, data: bytes | bytearray | memoryview, source: Source) -> bytes:
        """A source's bytes out of this read's bytes."""
        if source.offset is None or source.length is None:
            return bytes(data)
        first = source.offset - (self.start or 0)
        return bytes(data[first : first + source.length])


def plan_reads(sources: Sequence[Source], policy: ReadPolicy, sizes: dict[str, int]) -> list[Read]:
    """The GETs that fetch every source once: ranges merged per object as the policy says.
    `sizes`: the size of the objects that hold ranges (a shard's), where known."""
    reads: list[Read] = []
    by_object: dict[str, list[Source]] = defaultdict(list)
    for source in dict.fromkeys(sources):
        if source.offset is None or source.length is None:
            reads.append(Read(source.uri, source.etag, None, None, [source]))
        else:
            by_object[source.uri].append(source)
    for uri, ranged in by_object.items():
        ranged.sort(key=lambda s: (s.offset, s.length))
        reads.extend(merge(uri, ranged, policy, sizes.get(uri)))
    return reads


def merge(uri: str, ranged: list[Source], policy: ReadPolicy, size: int | None) -> list[Read]:
    """Sorted ranges of one object as few reads."""
    spans: list[Read] = []
    for source in ranged:
        assert source.offset is not None and source.length is not None
        end = source.offset + source.length
        last = spans[-1] if spans else None
        if last is not None:
            assert last.start is not None and last.length is not None
            last_end = last.start + last.length
            if source.offset - last_end <= policy.hole and max(end, last_end) - last.start <= policy.cap:
                last.length = max(end, last_end) - last.start
                last.sources.append(source)
                continue
        spans.append(Read(uri, source.etag, source.offset, source.length, [source]))
    covered = sum(span.length or 0 for span in spans)
    if size and size <= policy.cap and len(spans) > 1 and covered >= policy.whole_fraction * size:
        whole = Read(uri, ranged[0].etag, None, None, [s for span in spans for s in span.sources])
        return [whole]
    return spans
