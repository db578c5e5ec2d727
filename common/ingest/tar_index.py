"""Where each member's data is in a tar, read from the headers in one sequential pass."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from common.errors import PermanentError

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZ": "bzip2", b"\xfd7": "xz", b"\x28\xb5": "zstd"}


class ShardUnreadable(PermanentError):
    """A tar shard whose members cannot be indexed (compressed, truncated, not a tar)."""


@dataclass(frozen=True)
class TarMember:
    """One regular file of a tar: its WebDataset key and extension, and its data's bytes."""

    key: str  # the name up to the first dot of its last part, with its folder (WebDataset's rule)
    extension: str  # the rest, lower-case: "jpg", "json", "seg.png"
    offset: int
    length: int


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's key and extension of a member name: `a/b.c.d` -> (`a/b`, `c.d`)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class Watched:
    """A read-only stream that keeps its first bytes (to tell a compressed shard), counts what
    was read and keeps the last TAIL bytes (to find the archive's end marker)."""

    TAIL = 64 * 1024

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.head = b""
        self.tail = b""
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if len(self.head) < 4:
            self.head += data[: 4 - len(self.head)]
        self.read_bytes += len(data)
        self.tail = (self.tail + data)[-self.TAIL :]
        return data

    def drain(self) -> None:
        while self.read(1024 * 1024):
            pass

    def ends_with_zeros_from(self, offset: int) -> bool:
        """Whether everything from `offset` to the end is zeros, at least the two zero blocks
        that end a tar (a tar cut short at a member's end has none)."""
        after = self.read_bytes - offset
        return END_MARKER <= after <= len(self.tail) and not self.tail[-after:].strip(b"\0")


END_MARKER = 1024  # two zero blocks end an archive
CUT_SHORT = frozenset({"unexpected end of data", "truncated header", "empty header"})  # tarfile's words


def index_tar(stream: IO[bytes], size: int, name: str) -> Iterator[TarMember]:
    """The regular members of a tar read in order from a stream of `size` bytes; ShardUnreadable
    (one line naming the shard and why) for a compressed, truncated or malformed one. The caller
    must read every member before trusting any: truncation shows at the end."""
    watched = Watched(stream)
    try:
        with tarfile.open(fileobj=watched, mode="r|") as archive:  # type: ignore[call-overload]
            for info in archive:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise ShardUnreadable(f"{name}: truncated (member {info.name} ends past the end)")
                key, extension = split_name(info.name)
                yield TarMember(key, extension, info.offset_data, info.size)
            end = archive.offset
        watched.drain()
    except tarfile.ReadError as exc:
        kind = COMPRESSED.get(watched.head[:2])
        if kind:
            raise ShardUnreadable(
                f"{name}: compressed ({kind}); members can only be read from an uncompressed tar"
            ) from exc
        if str(exc) in CUT_SHORT:
            raise ShardUnreadable(f"{name}: truncated ({exc} within its {size} bytes)") from exc
        raise ShardUnreadable(f"{name}: not a readable tar ({exc})") from exc
    if not watched.ends_with_zeros_from(end):
        raise ShardUnreadable(f"{name}: truncated (no end-of-archive marker after its last member)")
