"""Reading the Kaggle `styles.csv`, quirks included."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

log = logging.getLogger(__name__)

CSV_HEADER = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
)
COLUMNS = (
    "id",
    "gender",
    "master_category",
    "sub_category",
    "article_type",
    "base_colour",
    "season",
    "year",
    "usage",
    "product_display_name",
)
# the `styles` table's types (as common/schema.sql creates it; made again after a drop-dataset)
STYLE_TYPES = {column: {"id": "bigint", "year": "integer"}.get(column, "text") for column in COLUMNS}
NULL_MARKERS = frozenset({"", "NA"})


@dataclass
class CatalogStats:
    """What reading the CSV found."""

    rows: int = 0
    repaired: int = 0  # extra commas joined back into productDisplayName
    rejected: int = 0  # lines that could not be read at all


@dataclass(frozen=True)
class RejectedLine:
    """A line that cannot become a row, with why."""

    line_number: int
    reason: str


Row = tuple[
    int,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
    int | None,
    str | None,
    str | None,
]


def read_styles(path: Path, stats: CatalogStats) -> Iterator[Row | RejectedLine]:
    """Stream rows of styles.csv; a malformed line yields a RejectedLine instead of raising."""
    with path.open(encoding="utf-8", newline="") as handle:
        check_header(handle.readline(), path)
        for line_number, line in enumerate(handle, start=2):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            parsed = parse_line(text, line_number)
            if isinstance(parsed, RejectedLine):
                stats.rejected += 1
            else:
                stats.rows += 1
                if text.count(",") > len(CSV_HEADER) - 1:
                    stats.repaired += 1
            yield parsed


def check_header(line: str, path: Path) -> None:
    """Refuse a file whose header is not the Kaggle one."""
    header = tuple(field.strip() for field in line.rstrip("\r\n").split(","))
    if header != CSV_HEADER:
        raise UserError(f"{path}: header is {','.join(header)!r}, expected {','.join(CSV_HEADER)!r}")


def parse_line(text: str, line_number: int) -> Row | RejectedLine:
    """One CSV line to a row; fields past the tenth belong to productDisplayName."""
    fields = text.split(",")
    if len(fields) < len(CSV_HEADER):
        return RejectedLine(line_number, f"{len(fields)} fields, expected {len(CSV_HEADER)}")
    if len(fields) > len(CSV_HEADER):
        fields = [*fields[: len(CSV_HEADER) - 1], ",".join(fields[len(CSV_HEADER) - 1 :])]
    values = [None if field.strip() in NULL_MARKERS else field.strip() for field in fields]
    try:
        style_id = int(values[0]) if values[0] is not None else None
    except ValueError:
        style_id = None
    if style_id is None:
        return RejectedLine(line_number, f"id {fields[0]!r} is not an integer")
    year = parse_year(values[7])
    if values[7] is not None and year is None:
        log.warning("line %d: year %r is not an integer; stored as NULL", line_number, values[7])
    return (
        style_id,
        values[1],
        values[2],
        values[3],
        values[4],
        values[5],
        values[6],
        year,
        values[8],
        values[9],
    )


def parse_year(value: str | None) -> int | None:
    """An integer year, or None for an empty or non-numeric field."""
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None
