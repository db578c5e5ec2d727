"""What is read is bounded before it is read: a JSON line past MANIFEST_LINE_MAX_BYTES is a
rejected line (never held whole), a Parquet row group past ROW_GROUP_MAX_BYTES is refused from the
footer, an image member or object of a known size past IMAGE_MAX_BYTES fails unread."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import Settings
from common.errors import ImageTooLarge, UserError
from common.ingest.manifest import BadLines, bounded_lines, check_row_group, jsonl_batches
from common.sources import Source
from common.storage import ObjectStore


def test_a_line_past_the_limit_is_skipped_in_pieces_and_the_rest_read() -> None:
    data = b'{"id": 1}\n' + b"x" * 5000 + b"\n" + b'{"id": 2}'
    assert list(bounded_lines(io.BytesIO(data), 100)) == [b'{"id": 1}\n', None, b'{"id": 2}']
    exact = b"y" * 100 + b"\n"  # the limit counts the line, not its newline
    assert list(bounded_lines(io.BytesIO(exact), 100)) == [exact]


def test_a_long_manifest_line_is_a_rejected_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    long_value = "z" * 4096
    path.write_text(
        json.dumps({"id": 1, "uri": "s3://b/1.jpg"}) + "\n" + json.dumps({"id": 2, "uri": long_value}) + "\n"
    )
    bad = BadLines()
    rows = [
        row
        for batch in jsonl_batches(path, "m.jsonl", set(), bad, line_max_bytes=1024)
        for row in batch.to_pylist()
    ]
    assert rows == [{"id": 1, "uri": "s3://b/1.jpg"}]
    assert bad.count == 1 and "longer than MANIFEST_LINE_MAX_BYTES (1,024 bytes)" in bad.shown[0]


def test_a_row_group_past_the_limit_is_refused_from_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"id": list(range(50_000)), "uri": ["s3://b/k.jpg"] * 50_000}), path, row_group_size=25_000
    )
    parquet = pq.ParquetFile(path)
    check_row_group(parquet, "m.parquet", 0, 64 * 1024 * 1024)  # small enough: no refusal
    with pytest.raises(
        UserError, match=r"row group 1 holds [\d,]+ bytes uncompressed \(ROW_GROUP_MAX_BYTES is 1,024\)"
    ):
        check_row_group(parquet, "m.parquet", 1, 1024)


def test_a_source_of_a_known_size_past_the_limit_is_refused_without_a_request() -> None:
    store = ObjectStore(
        Settings(image_max_bytes=1024, s3_endpoint_url="http://127.0.0.1:1")
    )  # nothing listens
    member = Source("s3://raw/packed/x.tar", offset=512, length=4096)
    with pytest.raises(ImageTooLarge, match=r"is 4,096 bytes \(IMAGE_MAX_BYTES is 1,024; not read\)"):
        store.read(member)
    assert isinstance(store.read_many([member])[member], ImageTooLarge)
