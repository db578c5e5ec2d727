"""The fast tar writer writes what `tarfile` writes, byte for byte, and refuses what USTAR can't hold."""

from __future__ import annotations

import io
import tarfile

import pytest

from common.tarball import TarWriter, members

MEMBERS = [
    ("1163-0.jpg", b"\xff\xd8" + bytes(range(256)) * 7),
    ("1163-0.json", b'{"id":1163}'),
    ("_raw/1163.png", b""),
    ("x" * 100, b"a" * 512),
    ("ünïcode-9.json", b"b" * 1023),
]


def with_tarfile(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("count", [0, 1, len(MEMBERS)])
def test_the_bytes_are_tarfiles_and_the_offsets_point_at_the_data(count: int) -> None:
    buffer = io.BytesIO()
    writer = TarWriter(buffer)
    offsets = [writer.add(name, data) for name, data in MEMBERS[:count]]
    writer.close()
    assert buffer.getvalue() == with_tarfile(MEMBERS[:count])
    assert writer.offset == len(buffer.getvalue())
    for offset, (_, data) in zip(offsets, MEMBERS, strict=False):
        assert buffer.getvalue()[offset : offset + len(data)] == data


def test_names_ustar_cannot_hold_are_refused_in_one_line() -> None:
    writer = TarWriter(io.BytesIO())
    with pytest.raises(ValueError, match="tar member name over 100 bytes"):
        writer.add("y" * 101, b"")


def test_members_read_back_what_was_written_and_refuse_what_is_not_such_an_archive() -> None:
    archive = with_tarfile(MEMBERS)
    assert list(members(archive)) == MEMBERS
    assert list(members(with_tarfile([]))) == []
    with pytest.raises(ValueError, match="checksum mismatch at byte 0"):
        list(members(b"X" + archive[1:]))
    with pytest.raises(ValueError, match="cut short"):
        list(members(archive[:700]))
    with pytest.raises(ValueError, match="without its end-of-archive blocks"):
        list(members(archive[: 512 + 2048]))  # the first member whole, nothing after
