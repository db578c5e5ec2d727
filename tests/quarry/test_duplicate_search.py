"""The pages of `producer duplicates` searched on several connections at once (quarry/duplicates.py)
find the same groups as one connection, on a real PostgreSQL with pgvector."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from common.config import Settings
from common.db import connect
from common.embeddings import ensure_set
from quarry import duplicates
from quarry.duplicates import find_duplicates
from tests.conftest import PrivateDatabase

DIMENSIONS = 64
ORIGINALS = 600  # random directions: no two within the threshold (64 dimensions)
EVERY = 30  # every 30th original is followed by COPIES near copies of it (the ids after its own)
COPIES = 3
PAGE = 64  # 11 pages, more than the searches held in flight; each group within one or two


@pytest.fixture
def planted(private_database: PrivateDatabase) -> Iterator[tuple[Settings, dict[int, list[int]]]]:
    """A set of ORIGINALS random embeddings, every EVERY-th followed by COPIES near copies of it;
    the groups expected."""
    rng = np.random.default_rng(11)
    rows: list[tuple[int, np.ndarray]] = []
    expected: dict[int, list[int]] = {}
    for index, vector in enumerate(rng.uniform(-1, 1, (ORIGINALS, DIMENSIONS))):
        rows.append((len(rows) + 1, vector))
        if index % EVERY == 0:
            group = [len(rows)]
            for _ in range(COPIES):
                rows.append((len(rows) + 1, vector + rng.uniform(-0.02, 0.02, DIMENSIONS)))
                group.append(len(rows))
            expected[group[0]] = group
    with private_database("dup_search", "schema") as env:
        settings = Settings(database_url=env["DATABASE_URL"])
        with connect(settings.database_url, autocommit=True) as conn:
            found = ensure_set(conn, settings, "items", "planted", b"planted", DIMENSIONS)
            with conn.cursor().copy(f"COPY {found.table} (id, embedding, image) FROM STDIN") as copy:
                for image_id, vector in rows:
                    copy.write_row((image_id, "[" + ",".join(f"{x:.6f}" for x in vector) + "]", b"\x00"))
        yield settings, expected


def recorded(conn: psycopg.Connection) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for group_id, image_id in conn.execute(
        "SELECT group_id, id FROM duplicates WHERE dataset = 'items' AND model = 'planted' ORDER BY id"
    ):
        groups.setdefault(group_id, []).append(image_id)
    return groups


def test_pages_searched_on_several_connections_find_the_groups_one_connection_finds(
    planted: tuple[Settings, dict[int, list[int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, expected = planted
    monkeypatch.setattr(duplicates, "PAGE", PAGE)
    with connect(settings.database_url, autocommit=True) as conn:
        several = find_duplicates(
            conn, settings.model_copy(update={"duplicates_connections": 3}), "items", "planted"
        )
        assert several.images == ORIGINALS + len(expected) * COPIES
        assert several.groups == expected
        assert recorded(conn) == expected
        one = find_duplicates(
            conn, settings.model_copy(update={"duplicates_connections": 1}), "items", "planted"
        )
        assert one.groups == expected
        assert recorded(conn) == expected
