"""Where an image's bytes are: an object of its own, or a byte range of a tar shard."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from common.errors import StorageError

LOCATOR = re.compile(r"^(s3://[^#]+)(?:#bytes=(\d+)-(\d+))?$")


@dataclass(frozen=True)
class Source:
    """One image's bytes: `uri` whole, or `length` bytes from `offset` (a tar member's data).
    `etag`: the ETag the object had when registered; None until pinned."""

    uri: str
    offset: int | None = None
    length: int | None = None
    etag: str | None = None
    object_size: int | None = field(default=None, compare=False)  # the whole object's, if known

    @property
    def locator(self) -> str:
        """One string naming the bytes: `s3://bucket/key`, or `s3://bucket/key#bytes=FIRST-LAST`
        (inclusive, as in an HTTP Range) for a member of a shard."""
        if self.offset is None or self.length is None:
            return self.uri
        return f"{self.uri}#bytes={self.offset}-{self.offset + self.length - 1}"

    @classmethod
    def from_locator(cls, text: str) -> Source:
        """The inverse of `locator` (no ETag: a locator is a reference, not a pin)."""
        match = LOCATOR.match(text)
        if match is None:
            raise StorageError(f"not an s3:// locator: {text!r}")
        uri, first, last = match.groups()
        if first is None:
            return cls(uri)
        return cls(uri, int(first), int(last) - int(first) + 1)
