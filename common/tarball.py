"""USTAR archives of regular files, fast: the bytes `tarfile` writes for the same members (mode
0644, owner 0:0 without names, mtime 0), and the members of such an archive read back.

`tarfile` builds and parses a header field by field in Python, about 40 us a member: a third of
the transform stage's time for a shard of small images, and a tenth of the inference stage's
(docs/benchmarks.md). A shard's members are all alike, so a header is one template with the
name, size and checksum filled in. tests/common/test_tarball.py compares with `tarfile` byte for
byte; archives from other tools (ingest's shards) are read with `tarfile` (common/ingest).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads the archive to whole records
NAME_MAX = 100  # longer names need USTAR's prefix field; no member of ours has one
SIZE_MAX = 8**11 - 1  # eleven octal digits

# name 100 | mode 8 | uid 8 | gid 8 | size 12 | mtime 12 | chksum 8 | typeflag 1 | linkname 100 |
# magic 6 | version 2 | uname 32 | gname 32 | devmajor 8 | devminor 8 | prefix 155 | pad 12
_HEAD = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_MTIME = b"00000000000\0"
_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 167)  # no device numbers: a file
_CHECKSUM_SPACES = sum(b" " * 8)
_CONSTANT_SUM = sum(_HEAD) + sum(_MTIME) + _CHECKSUM_SPACES + sum(_TAIL)  # the fields that never change
ZERO_BLOCK = bytes(BLOCK)


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular file `name` of `size` bytes."""
    encoded = name.encode()
    if len(encoded) > NAME_MAX:
        raise ValueError(f"tar member name over {NAME_MAX} bytes: {name[:40]}...")
    if not 0 <= size <= SIZE_MAX:
        raise ValueError(f"tar member {name} of {size} bytes: USTAR holds at most {SIZE_MAX}")
    size_field = b"%011o\0" % size
    checksum = sum(encoded) + sum(size_field) + _CONSTANT_SUM  # NUL padding adds nothing
    return encoded.ljust(NAME_MAX, b"\0") + _HEAD + size_field + _MTIME + b"%06o\0 " % checksum + _TAIL


def padding(size: int) -> bytes:
    """The zeros that end a member's data on a block boundary."""
    return b"\0" * (-size % BLOCK)


class TarWriter:
    """Regular files appended to `file`, then the end-of-archive blocks; `offset` after `add` is
    where the next member's header starts, and `add` returns where its data starts."""

    def __init__(self, file: Writable) -> None:
        self.file = file
        self.offset = 0

    def add(self, name: str, data: bytes) -> int:
        head = header(name, len(data))
        self.file.write(head)
        self.file.write(data)
        self.file.write(padding(len(data)))
        start = self.offset + BLOCK
        self.offset = start + len(data) + (-len(data) % BLOCK)
        return start

    def close(self) -> None:
        end = self.offset + 2 * BLOCK
        self.file.write(b"\0" * (2 * BLOCK + (-end % RECORD)))
        self.offset = end + (-end % RECORD)


def octal(field: bytes) -> int:
    """A header's number: octal digits ended by NUL or space."""
    return int(field.strip(b" \0") or b"0", 8)


def members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The (name, bytes) of each regular file of an archive `TarWriter` wrote, in order;
    ValueError for anything else (a checksum that does not add up, a link, a cut archive)."""
    view = memoryview(data)
    position = 0
    while position + BLOCK <= len(data):
        head = data[position : position + BLOCK]
        if head == ZERO_BLOCK:
            return
        if head[257:263] != b"ustar\0" or head[156:157] not in (b"0", b"\0"):
            raise ValueError(f"not a USTAR regular file at byte {position}")
        if octal(head[148:156]) != sum(head[:148]) + _CHECKSUM_SPACES + sum(head[156:]):
            raise ValueError(f"tar header checksum mismatch at byte {position}")
        name = head[:NAME_MAX].split(b"\0", 1)[0].decode()
        prefix = head[345:500].split(b"\0", 1)[0].decode()
        size = octal(head[124:136])
        start = position + BLOCK
        if start + size > len(data):
            raise ValueError(f"tar member {name} cut short: {size} bytes announced at byte {start}")
        yield (f"{prefix}/{name}" if prefix else name), bytes(view[start : start + size])
        position = start + size + (-size % BLOCK)
    raise ValueError("tar archive without its end-of-archive blocks")
