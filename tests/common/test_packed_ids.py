"""Ids as binary bigint[]: round trips through PostgreSQL, and cutting piece by piece."""

import random

import psycopg
import pytest

from common.packed_ids import PackedIds, fill, register_packed_ids


@pytest.mark.parametrize("ids", [[], [7], [1, 2, 3], [-(2**63), 0, 2**63 - 1]])
def test_ids_round_trip_through_postgresql_as_a_bigint_array(db: psycopg.Connection, ids: list[int]) -> None:
    register_packed_ids(db)
    row = db.execute("SELECT %s::bigint[], %s::bigint[]", (PackedIds.of(ids), ids), binary=True).fetchone()
    assert row is not None
    sent, loaded = row
    assert sent.ids() == ids and loaded.ids() == ids


def test_a_two_dimension_array_is_refused() -> None:
    with pytest.raises(ValueError, match="one-dimension"):
        PackedIds.from_binary(b"\x00\x00\x00\x02" + b"\x00" * 24)


@pytest.mark.parametrize("seed", range(20))
def test_filling_run_by_run_gives_the_pieces_of_the_whole(seed: int) -> None:
    draw = random.Random(seed)
    ids = sorted(draw.sample(range(10**6), draw.randint(0, 400)))
    size = draw.randint(1, 50)
    cuts = sorted(draw.sample(range(len(ids) + 1), min(len(ids) + 1, draw.randint(0, 6))))
    carry, pieces = PackedIds.of([]), []
    for start, stop in zip([0, *cuts], [*cuts, len(ids)], strict=True):
        full, carry = fill(carry, PackedIds.of(ids[start:stop]), size)
        assert all(len(piece) == size for piece in full) and len(carry) < size
        pieces += [piece.ids() for piece in full]
    if len(carry):
        pieces.append(carry.ids())
    assert pieces == [ids[i : i + size] for i in range(0, len(ids), size)]
