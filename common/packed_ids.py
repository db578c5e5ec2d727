"""Image ids as PostgreSQL sends and takes a `bigint[]` in binary: read, cut and written back
without making a Python int of any id.

A slice of a selection comes back from the server as one sorted `bigint[]`; the recorder cuts it
into chunks and COPYs each chunk into `job_chunks.image_ids`. In the binary format (array_send)
every element is a 4-byte length and an 8-byte value, so a chunk is a byte range of the slice
behind a new 20-byte header: cutting 10^6 ids costs copying 12 MB, not 10^6 conversions.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format

INT8_OID = 20
INT8_ARRAY_OID = 1016
HEADER = struct.Struct(">iiIii")  # dimensions, has-nulls flag, element type, length, lower bound
EMPTY = struct.Struct(">iiI")  # a zero-dimension array: no length, no bound
ELEMENT_BYTES = 12  # int4 length (always 8) + int8 value, big-endian


@dataclass(frozen=True)
class PackedIds:
    """A one-dimension `bigint[]` without NULLs, as its binary elements."""

    elements: memoryview  # ELEMENT_BYTES per id

    def __len__(self) -> int:
        return len(self.elements) // ELEMENT_BYTES

    @classmethod
    def from_binary(cls, data: Buffer) -> PackedIds:
        """Parse array_send's output; ValueError for anything but a NULL-free 1-D bigint[]."""
        view = memoryview(data).cast("B")
        dimensions, has_nulls, element_type = EMPTY.unpack_from(view)
        if dimensions == 0:
            return cls(memoryview(b""))
        if dimensions != 1 or has_nulls or element_type != INT8_OID:
            raise ValueError("expected a one-dimension bigint[] without NULLs")
        _, _, _, count, _ = HEADER.unpack_from(view)
        elements = view[HEADER.size :]
        if len(elements) != count * ELEMENT_BYTES:
            raise ValueError(f"a bigint[] of {count} elements holds {len(elements)} bytes")
        return cls(elements)

    @classmethod
    def of(cls, ids: list[int]) -> PackedIds:
        """From Python ints (tests and small selections)."""
        return cls(memoryview(b"".join(struct.pack(">iq", 8, i) for i in ids)))

    def to_binary(self) -> bytes:
        if not len(self):
            return EMPTY.pack(0, 0, INT8_OID)
        return HEADER.pack(1, 0, INT8_OID, len(self), 1) + self.elements

    def __add__(self, other: PackedIds) -> PackedIds:
        if not len(self):
            return other
        return PackedIds(memoryview(bytes(self.elements) + bytes(other.elements)))

    def part(self, start: int, stop: int | None = None) -> PackedIds:
        """Ids `start` to `stop` (not included), as Python slices them."""
        end = None if stop is None else stop * ELEMENT_BYTES
        return PackedIds(self.elements[start * ELEMENT_BYTES : end])

    def ids(self) -> list[int]:
        return [value for _, value in struct.iter_unpack(">iq", self.elements)]

    def cut(self, size: int) -> Iterator[PackedIds]:
        """Consecutive pieces of at most `size` ids, in order."""
        for start in range(0, len(self), size):
            yield self.part(start, start + size)


def fill(carry: PackedIds, more: PackedIds, size: int) -> tuple[list[PackedIds], PackedIds]:
    """The full pieces of `size` ids that `carry` then `more` make, and the ids left over (fewer
    than `size`): cutting a sorted run piece by piece this way gives the pieces cutting it whole
    would."""
    need = size - len(carry)
    if len(more) < need:
        return [], carry + more
    pieces = [carry + more.part(0, need)]
    rest = more.part(need)
    whole = len(rest) - len(rest) % size
    pieces.extend(rest.part(0, whole).cut(size))
    return pieces, rest.part(whole)


class PackedIdsLoader(Loader):
    """Loads a binary `bigint[]` result column as PackedIds."""

    format = Format.BINARY

    def load(self, data: Buffer) -> PackedIds:
        return PackedIds.from_binary(data)


class PackedIdsDumper(Dumper):
    """Sends PackedIds as a binary `bigint[]` (a COPY row or a parameter)."""

    format = Format.BINARY
    oid = INT8_ARRAY_OID

    def dump(self, obj: PackedIds) -> bytes:
        return obj.to_binary()


def register_packed_ids(context: AdaptContext) -> None:
    """`bigint[]` results load as PackedIds, and PackedIds dump as `bigint[]`, on `context`."""
    context.adapters.register_loader(INT8_ARRAY_OID, PackedIdsLoader)
    context.adapters.register_dumper(PackedIds, PackedIdsDumper)
