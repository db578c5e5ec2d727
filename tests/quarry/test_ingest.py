import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from common.config import Settings
from common.storage import ObjectStore
from quarry.ingest import ingest
from tests.conftest import SAMPLE

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


@pytest.fixture
def empty_catalog(db: psycopg.Connection) -> Iterator[None]:
    db.execute("TRUNCATE styles, images")
    yield
    db.execute("TRUNCATE styles, images")


@pytest.fixture
def quirky_dataset(tmp_path: Path) -> Path:
    """Three real images plus every quirk: a comma in a name, NA, an empty year, a row with no
    image, a zero-byte file, a corrupt file, a duplicate id, an unreadable line, a stray file."""
    images = tmp_path / "images"
    images.mkdir()
    real = sorted(SAMPLE.glob("images/*.jpg"))[:3]
    ids = [int(path.stem) for path in real]
    for path in real:
        shutil.copy(path, images / path.name)
    (images / "900001.jpg").write_bytes(b"")
    (images / "900002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (images / "notes.txt").write_text("not an image")
    rows = [
        f"{ids[0]},Men,Apparel,Topwear,Shirts,NA,Fall,2012,Casual,Plain, Blue, Shirt",
        f"{ids[1]},Women,Footwear,Shoes,Heels,Black,Summer,,Casual,Heels",
        f"{ids[2]},Men,Accessories,Watches,Watches,Black,Winter,2016,Casual,Old name",
        f"{ids[2]},Men,Accessories,Watches,Watches,Black,Winter,2016,Casual,New name",
        "900001,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,Empty file",
        "900002,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,Corrupt file",
        "900003,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,No image",
        "900004,Men,Apparel",
    ]
    (tmp_path / "styles.csv").write_bytes(("\r\n".join([HEADER, *rows]) + "\r\n").encode())
    return tmp_path


@pytest.mark.usefixtures("empty_catalog")
def test_ingest_handles_every_quirk_and_reruns_cheaply(
    db: psycopg.Connection, store: ObjectStore, settings: Settings, quirky_dataset: Path
) -> None:
    first = ingest(db, store, quirky_dataset, settings.raw_bucket, concurrency=4)
    assert (first.rows, first.repaired, first.rejected, first.duplicate_ids) == (7, 1, 1, 1)
    assert (first.uploaded, first.present, first.bad, first.unrecognised_files) == (3, 0, 2, 1)
    assert first.missing == 1  # 900003 has a row but no file

    names = dict(db.execute("SELECT id, product_display_name FROM styles").fetchall())
    assert "Plain, Blue, Shirt" in names.values()
    assert "New name" in names.values() and "Old name" not in names.values()
    assert db.execute("SELECT count(*) FROM styles WHERE base_colour IS NULL").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM styles WHERE year IS NULL").fetchone() == (1,)
    bad = dict(db.execute("SELECT id, error FROM images WHERE status = 'bad'").fetchall())
    assert "empty" in bad[900001] and "not a decodable image" in bad[900002]
    stored = db.execute("SELECT raw_key, width, height FROM images WHERE status = 'stored'").fetchall()
    for key, width, height in stored:
        assert store.get(settings.raw_bucket, key)[:2] == b"\xff\xd8"
        assert width > 0 and height > 0

    again = ingest(db, store, quirky_dataset, settings.raw_bucket, concurrency=4)
    assert (again.uploaded, again.present, again.bad) == (0, 3, 2)

    other_bucket = ingest(db, store, quirky_dataset, f"{settings.raw_bucket}-new", concurrency=4)
    assert (other_bucket.uploaded, other_bucket.present) == (3, 0)  # records of another bucket
    back = ingest(db, store, quirky_dataset, settings.raw_bucket, concurrency=4)
    assert (back.uploaded, back.present) == (3, 0)  # rows now name the other bucket's marker
    assert db.execute("SELECT count(*) FROM styles").fetchone() == (6,)  # 7 rows, one id twice
