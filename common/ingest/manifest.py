"""Reading a manifest (CSV, JSON Lines or Parquet; a local file or an s3:// object or prefix) as
Arrow record batches, the first bad lines shown and every one counted."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from common.errors import UserError
from common.storage import ObjectStore

log = logging.getLogger(__name__)

BATCH_ROWS = 65_536  # rows per Arrow batch: memory stays flat however long the manifest is
SHOWN = 20  # unreadable lines printed one by one before only counting
LINE_MAX_BYTES = 1024 * 1024  # MANIFEST_LINE_MAX_BYTES' default, for callers without settings
EXTENSIONS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class BadLines:
    """Manifest lines that could not be read: counted, the first SHOWN kept as `file:line: why`."""

    count: int = 0
    shown: list[str] = field(default_factory=list)

    def add(self, where: str, line: int | None, reason: str) -> None:
        self.count += 1
        if len(self.shown) < SHOWN:
            text = f"{where}:{line if line is not None else '?'}: {reason}"
            self.shown.append(text)
            log.warning("manifest line skipped: %s", text)


def format_of(name: str) -> str | None:
    """The manifest format a file name says, or None."""
    return EXTENSIONS.get(Path(name).suffix.lower())


def manifest_sources(store: ObjectStore, source: str) -> list[str]:
    """The manifest files of SOURCE: a local file, every manifest file of a local folder, an
    s3:// object, or every manifest object under an s3:// prefix; in name order."""
    if source.startswith("s3://"):
        found = [uri for uri, _, _ in store.list_objects(source) if format_of(uri)]
        exact = [uri for uri in found if uri == source]
        return exact or sorted(found)
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file() and format_of(p.name))
    raise UserError(f"manifest {source}: no such file or folder")


@contextmanager
def local_copy(store: ObjectStore, source: str) -> Iterator[Path]:
    """A local path of the manifest: the file itself, or an s3:// object streamed to a
    temporary file (Parquet needs to seek; nothing is held in memory)."""
    if not source.startswith("s3://"):
        yield Path(source)
        return
    with tempfile.NamedTemporaryFile(suffix=Path(source).suffix) as handle:
        body = store.open(source)
        shutil.copyfileobj(body, handle, length=8 * 1024 * 1024)
        handle.flush()
        yield Path(handle.name)


def read_batches(
    path: Path,
    name: str,
    source_format: str,
    text_columns: set[str],
    bad: BadLines,
    line_max_bytes: int = LINE_MAX_BYTES,
) -> Iterator[pa.RecordBatch]:
    """The manifest's rows as Arrow batches of one schema (the first batch's). Columns in
    `text_columns` are read as text (their type is given by the user and PostgreSQL casts them);
    a JSON line longer than `line_max_bytes` is a bad line, never held whole."""
    if source_format == "parquet":
        yield from parquet_batches(path, name)
    elif source_format == "csv":
        yield from csv_batches(path, name, text_columns, bad)
    elif source_format == "jsonl":
        yield from jsonl_batches(path, name, text_columns, bad, line_max_bytes)
    else:
        raise UserError(f"manifest {name}: unknown format {source_format!r} (csv, jsonl, parquet)")


def parquet_batches(path: Path, name: str) -> Iterator[pa.RecordBatch]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"manifest {name}: not a Parquet file ({exc})") from exc
    yield from parquet.iter_batches(batch_size=BATCH_ROWS)


def csv_batches(path: Path, name: str, text_columns: set[str], bad: BadLines) -> Iterator[pa.RecordBatch]:
    def skip(row: pa_csv.InvalidRow) -> str:
        bad.add(name, row.number, f"{row.actual_columns} fields, expected {row.expected_columns}")
        return "skip"

    try:
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(use_threads=False),  # with threads, no line numbers
            parse_options=pa_csv.ParseOptions(invalid_row_handler=skip),
            convert_options=pa_csv.ConvertOptions(
                column_types={column: pa.string() for column in text_columns}, strings_can_be_null=True
            ),
        )
        yield from reader
    except pa.ArrowInvalid as exc:
        raise UserError(
            f"manifest {name}: {str(exc).splitlines()[0]} (types are inferred from the first rows;"
            " give a column's type with --column-type)"
        ) from exc


def jsonl_batches(
    path: Path, name: str, text_columns: set[str], bad: BadLines, line_max_bytes: int = LINE_MAX_BYTES
) -> Iterator[pa.RecordBatch]:
    """JSON Lines, one object per line; a line that is not one, or is longer than
    `line_max_bytes`, is counted, not fatal."""
    schema: pa.Schema | None = None
    rows: list[dict[str, object]] = []
    with path.open("rb") as handle:
        for number, line in enumerate(bounded_lines(handle, line_max_bytes), start=1):
            if line is None:
                bad.add(name, number, f"longer than MANIFEST_LINE_MAX_BYTES ({line_max_bytes:,} bytes)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.add(name, number, f"not JSON ({exc.msg})")
                continue
            except UnicodeDecodeError as exc:
                bad.add(name, number, f"not UTF-8 text ({exc.reason})")
                continue
            if not isinstance(row, dict):
                bad.add(name, number, "not a JSON object")
                continue
            for column in text_columns & row.keys():
                row[column] = None if row[column] is None else str(row[column])
            rows.append(row)
            if len(rows) >= BATCH_ROWS:
                schema = yield from jsonl_batch(rows, schema, name)
                rows = []
    if rows:
        yield from jsonl_batch(rows, schema, name)


def bounded_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """Each line of a binary file, or None for a line longer than `limit` bytes (read past in
    pieces of `limit`, never held whole)."""
    while line := handle.readline(limit + 1):
        if len(line) <= limit or (line.endswith(b"\n") and len(line) == limit + 1):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = handle.readline(limit)
        yield None


def jsonl_batch(
    rows: list[dict[str, object]], schema: pa.Schema | None, name: str
) -> Generator[pa.RecordBatch, None, pa.Schema]:
    """One batch of parsed lines, in the schema of the first (returned, for the next)."""
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"manifest {name}: {exc} (give the column's type with --column-type)") from exc
    yield from table.to_batches()
    return table.schema


def check_row_group(parquet: pq.ParquetFile, name: str, group: int, max_bytes: int) -> None:
    """UserError for a row group whose rows take more than `max_bytes` uncompressed (from the
    file's footer: nothing of the group is read)."""
    size = parquet.metadata.row_group(group).total_byte_size
    if size > max_bytes:
        raise UserError(
            f"manifest {name}: row group {group} holds {size:,} bytes uncompressed"
            f" (ROW_GROUP_MAX_BYTES is {max_bytes:,}): write it with smaller row groups"
        )
