from pathlib import Path

import pytest

from common.catalog import CatalogStats, RejectedLine, parse_line, read_styles
from common.errors import UserError

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def test_extra_commas_are_joined_back_into_the_name() -> None:
    row = parse_line(
        "44065,Men,Personal Care,Fragrance,Perfume and Body Mist,Blue,Spring,2017,Casual,"
        "Boss Men Perfume, After Shave Balm and Shower Gel Set",
        2,
    )
    assert not isinstance(row, RejectedLine)
    assert row[0] == 44065
    assert row[9] == "Boss Men Perfume, After Shave Balm and Shower Gel Set"


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("1,Men,Apparel,Topwear,Shirts,NA,Fall,2012,Casual,Shirt", 5, None),  # literal NA
        ("1,Men,Apparel,Topwear,Shirts,Blue,Fall,,Casual,Shirt", 7, None),  # empty year
        ("1,Men,Apparel,Topwear,Shirts,Blue,Fall,2012.0,Casual,Shirt", 7, 2012),
        ("1,Men,Apparel,Topwear,Shirts,Blue,Fall,soon,Casual,Shirt", 7, None),
        ("1,Men,Apparel,Topwear,Shirts,Blue,Fall,2012,Casual,", 9, None),
    ],
)
def test_field_values(line: str, field: int, expected: object) -> None:
    row = parse_line(line, 2)
    assert not isinstance(row, RejectedLine)
    assert row[field] == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("1,Men,Apparel", "3 fields"),
        ("x,Men,Apparel,Topwear,Shirts,Blue,Fall,2012,Casual,S", "not an integer"),
    ],
)
def test_unreadable_lines_are_rejected_with_a_reason(line: str, reason: str) -> None:
    row = parse_line(line, 7)
    assert isinstance(row, RejectedLine)
    assert row.line_number == 7
    assert reason in row.reason


def test_read_styles_counts_repairs_and_rejections(tmp_path: Path) -> None:
    csv = tmp_path / "styles.csv"
    csv.write_bytes(
        (
            f"{HEADER}\r\n1,Men,Apparel,Topwear,Shirts,Blue,Fall,2012,Casual,A, B\r\n"
            "2,Men\r\n\r\n3,Women,Apparel,Topwear,Tops,Red,Summer,2013,Casual,C\r\n"
        ).encode()
    )
    stats = CatalogStats()
    rows = list(read_styles(csv, stats))
    assert [r[0] for r in rows if not isinstance(r, RejectedLine)] == [1, 3]
    assert (stats.rows, stats.repaired, stats.rejected) == (2, 1, 1)


def test_a_foreign_header_is_refused(tmp_path: Path) -> None:
    csv = tmp_path / "styles.csv"
    csv.write_text("id,name\n1,x\n")
    with pytest.raises(UserError, match="header"):
        list(read_styles(csv, CatalogStats()))
