import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import psycopg
import pytest

from common.config import Settings
from common.ingest.summary import IngestSummary
from common.storage import ObjectStore
from quarry.ingest import IngestRequest, ingest
from tests.conftest import SAMPLE
from tests.photographs import bomb

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


@pytest.fixture
def empty_catalog(db: psycopg.Connection) -> Iterator[None]:
    db.execute("TRUNCATE styles, datasets, shards, locations")
    yield
    db.execute("TRUNCATE styles, datasets, shards, locations")


@pytest.fixture
def quirky_dataset(tmp_path: Path) -> Path:
    """Three real images plus every quirk: a comma in a name, NA, an empty year, a row with no
    image, a zero-byte file, a corrupt file, a decompression bomb, a duplicate id, an unreadable
    line, a stray file."""
    images = tmp_path / "images"
    images.mkdir()
    real = sorted(SAMPLE.glob("images/*.jpg"))[:3]
    ids = [int(path.stem) for path in real]
    for path in real:
        shutil.copy(path, images / path.name)
    (images / "900001.jpg").write_bytes(b"")
    (images / "900002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (images / "900005.jpg").write_bytes(bomb())
    (images / "notes.txt").write_text("not an image")
    rows = [
        f"{ids[0]},Men,Apparel,Topwear,Shirts,NA,Fall,2012,Casual,Plain, Blue, Shirt",
        f"{ids[1]},Women,Footwear,Shoes,Heels,Black,Summer,,Casual,Heels",
        f"{ids[2]},Men,Accessories,Watches,Watches,Black,Winter,2016,Casual,Old name",
        f"{ids[2]},Men,Accessories,Watches,Watches,Black,Winter,2016,Casual,New name",
        "900001,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,Empty file",
        "900002,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,Corrupt file",
        "900003,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,No image",
        "900005,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,Bomb",
        "900004,Men,Apparel",
    ]
    (tmp_path / "styles.csv").write_bytes(("\r\n".join([HEADER, *rows]) + "\r\n").encode())
    return tmp_path


@pytest.mark.usefixtures("empty_catalog")
def test_ingest_handles_every_quirk_and_reruns_cheaply(
    db: psycopg.Connection, store: ObjectStore, settings: Settings, quirky_dataset: Path
) -> None:
    first = fashion(db, store, settings, quirky_dataset)
    assert (first.rows, first.repaired, first.rejected, first.duplicate_ids) == (8, 1, 1, 1)
    assert (first.packed, first.shards, first.present, first.bad, first.unrecognised_files) == (3, 1, 0, 3, 1)
    assert first.missing == 1  # 900003 has a row but no file

    names = dict(db.execute("SELECT id, product_display_name FROM styles").fetchall())
    assert "Plain, Blue, Shirt" in names.values()
    assert "New name" in names.values() and "Old name" not in names.values()
    assert db.execute("SELECT count(*) FROM styles WHERE base_colour IS NULL").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM styles WHERE year IS NULL").fetchone() == (1,)
    bad = dict(db.execute("SELECT id, error FROM images WHERE status = 'bad'").fetchall())
    assert "empty" in bad[900001] and "not a decodable image" in bad[900002]
    assert bad[900005].startswith("image too large: 30000×30000")  # refused from its header
    stored = db.execute(
        "SELECT l.id, s.uri, l.byte_offset, l.byte_length, l.width, l.height FROM locations l"
        " JOIN shards s ON s.id = l.shard"
    ).fetchall()
    assert len(stored) == 3 and len({uri for _, uri, *_ in stored}) == 1  # one packed shard
    for image_id, uri, offset, length, width, height in stored:
        assert uri.startswith(f"s3://{settings.raw_bucket}/packed/styles/")
        shard = store.get(settings.raw_bucket, uri.split("/", 3)[3])
        assert shard[offset : offset + 2] == b"\xff\xd8" and length > 0  # a JPEG starts there
        full = cv2.imread(str(quirky_dataset / "images" / f"{image_id}.jpg"))  # checked at 1/8: sizes whole
        assert (width, height) == (full.shape[1], full.shape[0])

    again = fashion(db, store, settings, quirky_dataset)
    assert (again.packed, again.shards, again.present, again.bad) == (0, 0, 3, 3)  # bad files read again

    for (uri,) in db.execute("SELECT DISTINCT s.uri FROM shards s JOIN locations l ON l.shard = s.id"):
        store.delete(settings.raw_bucket, uri.split("/", 3)[3])  # as if the bucket were wiped (other
        # databases' shards in it, the tests' template among them, are left alone)
    back = fashion(db, store, settings, quirky_dataset)
    assert (back.packed, back.shards, back.present) == (3, 1, 0)  # lost shards noticed, packed again
    assert db.execute("SELECT count(*) FROM styles").fetchone() == (7,)  # 8 rows, one id twice


def fashion(db: psycopg.Connection, store: ObjectStore, settings: Settings, folder: Path) -> IngestSummary:
    return ingest(db, store, IngestRequest(str(folder)), settings.raw_bucket, concurrency=4)
