"""Planning slices of a dataset's id range (pure: no database)."""

import pytest

from quarry.slicing import MAX_SLICES, plan_slices


@pytest.mark.parametrize(
    ("bounds", "slice_ids", "ranges"),
    [
        ((1, 10), 4, [(1, 5), (5, 9), (9, 11)]),
        ((100, 100), 250_000, [(100, 101)]),
        ((-5, 4), 5, [(-5, 0), (0, 5)]),
    ],
)
def test_slices_cover_the_range_once_then_one_takes_what_is_outside(
    bounds: tuple[int, int], slice_ids: int, ranges: list[tuple[int, int]]
) -> None:
    plan = plan_slices(bounds, slice_ids, None)
    *bounded, outside = plan.slices
    assert [(s.low, s.high) for s in bounded] == ranges and not any(s.streamed for s in bounded)
    assert (outside.low, outside.high, outside.streamed) == (bounds[0], bounds[1] + 1, True)
    assert [s.number for s in plan.slices] == list(range(len(ranges) + 1))
    assert plan.note == f"recorded in {len(ranges)} slices of {slice_ids} ids"


def test_a_sparse_id_range_gets_wider_slices_not_more() -> None:
    plan = plan_slices((0, 10**15), 250_000, None)
    assert len(plan.slices) - 1 <= MAX_SLICES
    assert plan.slices[-2].high == 10**15 + 1


@pytest.mark.parametrize(
    ("bounds", "keep_whole", "note"),
    [
        ((1, 10), "it has a LIMIT", "recorded as one slice: it has a LIMIT"),
        (None, None, "recorded as one slice: the dataset has no rows yet"),
    ],
)
def test_a_query_kept_whole_is_one_streamed_slice(
    bounds: tuple[int, int] | None, keep_whole: str | None, note: str
) -> None:
    plan = plan_slices(bounds, 4, keep_whole)
    assert [(s.low, s.high, s.streamed) for s in plan.slices] == [(None, None, True)]
    assert plan.note == note
