"""The schema: a version-2 catalog (one `images` table of raw objects) migrates in place."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from common.db import SCHEMA_VERSION, connect, ensure_schema
from tests.conftest import PrivateDatabase

V2_IMAGES = """
CREATE TABLE schema_version (version integer NOT NULL);
INSERT INTO schema_version VALUES (2);
CREATE TABLE images (
    id bigint PRIMARY KEY, raw_key text, size_bytes bigint NOT NULL, width integer, height integer,
    checksum text NOT NULL, status text NOT NULL, error text, store_id text,
    updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO images (id, raw_key, size_bytes, width, height, checksum, status, error) VALUES
    (1, 'images/1.jpg', 100, 60, 80, 'aa', 'stored', NULL),
    (2, NULL, 0, NULL, NULL, 'bb', 'bad', 'empty file (0 bytes)');
"""


@pytest.fixture
def v2_database(private_database: PrivateDatabase) -> Iterator[psycopg.Connection]:
    with private_database("v2", "bare") as env, connect(env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(V2_IMAGES)
        yield conn


def test_a_version_2_catalog_becomes_locations_of_the_styles_dataset(v2_database: psycopg.Connection) -> None:
    ensure_schema(v2_database, "old-raw")
    ensure_schema(v2_database, "old-raw")  # and again: nothing changes
    rows = v2_database.execute("SELECT id, uri, error, width FROM locations ORDER BY id").fetchall()
    assert rows == [(1, "s3://old-raw/images/1.jpg", None, 60), (2, None, "empty file (0 bytes)", None)]
    assert v2_database.execute("SELECT id, status FROM images ORDER BY id").fetchall() == [
        (1, "stored"),
        (2, "bad"),
    ]
    assert v2_database.execute("SELECT name, format FROM datasets").fetchall() == [("styles", "kaggle")]
    assert v2_database.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_current_schema_is_left_alone_while_a_selection_reads_its_views(
    v2_database: psycopg.Connection,
) -> None:
    """Replacing the `images` view would wait for every open reader of it; a current schema needs
    no DDL, so a producer command starts at once beside a long selection."""
    ensure_schema(v2_database, "old-raw")
    url = v2_database.info.dsn
    with connect(url) as reader:
        reader.execute("SELECT count(*) FROM images")  # its transaction stays open, holding the view
        with connect(url, autocommit=True) as other:
            other.execute("SET lock_timeout = '1s'")
            ensure_schema(other, "old-raw")  # would time out on the view's lock if it ran the DDL
        reader.rollback()
