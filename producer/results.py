"""`producer results`: a job's item rows from PostgreSQL as JSON Lines or parquet, streamed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

RESULT_COLUMNS = ("image_id", "variant", "status", "uri", "error", "label", "score", "top_k")
PARQUET_BATCH_ROWS = 10_000  # rows held in memory at once


def write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    count = 0
    for row in rows:
        out.write(json.dumps(row) + "\n")
        count += 1
    return count


def batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


def write_parquet(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """One row group per PARQUET_BATCH_ROWS rows, so memory stays flat however big the job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("image_id", pa.int64()),
            ("variant", pa.int32()),
            ("status", pa.string()),
            ("uri", pa.string()),
            ("error", pa.string()),
            ("label", pa.string()),
            ("score", pa.float32()),
            ("top_k", pa.string()),  # JSON text: [{"label", "score"}, ...]
        ]
    )
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches(rows, PARQUET_BATCH_ROWS):
            columns = {name: [row.get(name) for row in batch] for name in RESULT_COLUMNS}
            columns["top_k"] = [
                json.dumps(value) if value is not None else None for value in columns["top_k"]
            ]
            writer.write_table(pa.table(columns, schema=schema))
            count += len(batch)
    return count
