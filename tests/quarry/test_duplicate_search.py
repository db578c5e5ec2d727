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
from common.errors import DatabaseUnavailable
from quarry import duplicates
from quarry.duplicates import find_duplicates
from tests.conftest import PrivateDatabase
from tests.stack import wait_until

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
            record_set(conn, settings, "planted", rows)
        yield settings, expected


def record_set(
    conn: psycopg.Connection, settings: Settings, model: str, rows: list[tuple[int, np.ndarray]]
) -> str:
    """The embedding set of dataset `items` under `model`, holding `rows`; its table."""
    found = ensure_set(conn, settings, "items", model, model.encode(), DIMENSIONS)
    with conn.cursor().copy(f"COPY {found.table} (id, embedding, image) FROM STDIN") as copy:
        for image_id, vector in rows:
            copy.write_row((image_id, "[" + ",".join(f"{x:.6f}" for x in vector) + "]", b"\x00"))
    return found.table


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


def test_searchers_ended_by_the_server_fail_in_one_line_and_the_groups_recorded_before_stay(
    planted: tuple[Settings, dict[int, list[int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL ends the search connections (pg_terminate_backend) between the first sweep and
    the wider one: one line naming the lost connection, and `duplicates` keeps the last run's."""
    settings, expected = planted
    monkeypatch.setattr(duplicates, "PAGE", PAGE)
    # the other client sessions (not an autovacuum worker on the freshly planted table)
    others = "datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    with connect(settings.database_url, autocommit=True) as conn:
        find_duplicates(conn, settings, "items", "planted")
        # a closed connection's backend exits a moment later: only the next run's searchers remain
        wait_until(
            lambda: conn.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {others}").fetchone() == (0,),
            30,
            "the first run's searchers to exit",
        )
        pages_of = duplicates.listed_pages
        ended: list[int] = []

        def end_the_searchers_first(ids: list[int]) -> Iterator[duplicates.Page]:
            rows = conn.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {others}")
            ended.extend(1 for (done,) in rows if done)
            return pages_of(ids)

        monkeypatch.setattr(duplicates, "listed_pages", end_the_searchers_first)
        with pytest.raises(DatabaseUnavailable) as raised:
            find_duplicates(conn, settings, "items", "planted")
        assert len(ended) == settings.duplicates_connections  # every searcher was ended
        message = str(raised.value)
        assert message.startswith("the connection to PostgreSQL was lost while finding near-duplicates (")
        assert message.endswith("the groups recorded before are kept; run the command again")
        assert "\n" not in message
        assert recorded(conn) == expected


def test_an_image_near_two_tight_groups_joins_them_though_their_members_see_only_each_other(
    private_database: PrivateDatabase,
) -> None:
    """Image 1, with nine copies almost on it (2-10) and, 0.06 away (within the default 0.08),
    nine copies of another image almost on each other (11-19): each of those sees only its eight
    siblings among its nearest, and image 1's nearest are its own copies, so the narrow search
    over every image finds two groups; the wider one over the images it paired joins them."""
    rng = np.random.default_rng(5)
    anchor = rng.normal(size=DIMENSIONS)
    anchor /= np.linalg.norm(anchor)
    across = rng.normal(size=DIMENSIONS)
    across -= across @ anchor * anchor
    across /= np.linalg.norm(across)
    other = 0.94 * anchor + np.sqrt(1 - 0.94**2) * across  # cosine distance 0.06 from the anchor
    vectors = [anchor, *(anchor + rng.normal(scale=1e-4, size=DIMENSIONS) for _ in range(9))]
    vectors += [other + rng.normal(scale=1e-4, size=DIMENSIONS) for _ in range(9)]
    vectors += list(rng.uniform(-1, 1, (200, DIMENSIONS)))  # unrelated images
    with private_database("dup_widen", "schema") as env:
        settings = Settings(database_url=env["DATABASE_URL"])
        with connect(settings.database_url, autocommit=True) as conn:
            table = record_set(conn, settings, "two", list(enumerate(vectors, start=1)))
            every_image = {"after": 0, "last": len(vectors)}
            narrow = duplicates.group(
                iter(
                    duplicates.search_page(conn, table, 0.08, duplicates.SWEEP, duplicates.RANGE, every_image)
                )
            )
            assert narrow == {1: list(range(1, 11)), 11: list(range(11, 20))}
            assert find_duplicates(conn, settings, "items", "two").groups == {1: list(range(1, 20))}
