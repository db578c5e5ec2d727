"""Pairs of near-duplicates joined into groups (quarry/duplicates.py): a pure unit."""

from __future__ import annotations

from quarry.duplicates import group


def test_pairs_join_into_groups_named_by_their_smallest_id() -> None:
    pairs = iter([(5, 9), (2, 9), (7, 8), (2, 5), (11, 12), (8, 11)])
    assert group(pairs) == {2: [2, 5, 9], 7: [7, 8, 11, 12]}


def test_no_pairs_no_groups() -> None:
    assert group(iter([])) == {}
