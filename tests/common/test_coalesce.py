from common.coalesce import ReadPolicy, plan_reads
from common.sources import Source

POLICY = ReadPolicy(hole=100, cap=1000, whole_fraction=0.95)
SHARD = "s3://raw/shard.tar"


def member(offset: int, length: int = 50, uri: str = SHARD) -> Source:
    return Source(uri, offset, length, '"e"')


def spans(reads: list) -> list[tuple[int | None, int | None, int]]:
    return [(r.start, r.length, len(r.sources)) for r in reads]


def test_neighbours_merge_across_small_holes_and_split_at_large_ones() -> None:
    reads = plan_reads([member(500), member(0), member(120), member(900)], POLICY, {})
    # 0-50 and 120-170 (hole 70) merge; 500 is 330 past 170; 900 is 350 past 550
    assert spans(reads) == [(0, 170, 2), (500, 50, 1), (900, 50, 1)]


def test_a_merged_read_never_passes_the_cap() -> None:
    reads = plan_reads([member(i * 100, 90) for i in range(25)], POLICY, {})
    assert all(r.length <= POLICY.cap for r in reads)
    assert sum(len(r.sources) for r in reads) == 25 and len(reads) == 3  # 0-990, 1000-1990, 2000-2490


def test_an_object_covered_almost_whole_is_read_whole_when_small_enough() -> None:
    dense = [member(i * 100, 98) for i in range(10)]  # 980 of 1,000 bytes, holes of 2
    assert spans(plan_reads(dense, ReadPolicy(hole=1, cap=1000, whole_fraction=0.95), {SHARD: 1000})) == [
        (None, None, 10)
    ]
    assert len(plan_reads(dense, ReadPolicy(hole=1, cap=500, whole_fraction=0.95), {SHARD: 1000})) > 1


def test_a_sparse_selection_takes_at_most_one_get_per_image_and_objects_stay_whole() -> None:
    sparse = [member(i * 10_000) for i in range(7)] + [Source("s3://b/a.jpg"), Source("s3://b/a.jpg")]
    reads = plan_reads(sparse, POLICY, {SHARD: 70_000})
    assert len(reads) == 8  # 7 ranges, 1 object (asked twice, read once)
    assert [r.start for r in reads if r.uri == "s3://b/a.jpg"] == [None]


def test_each_source_gets_its_own_bytes_back() -> None:
    data = bytes(range(256)) * 8
    sources = [member(10, 5), member(40, 7), member(60, 1)]
    (read,) = plan_reads(sources, POLICY, {})
    got = data[read.start : read.start + read.length]
    assert [read.slice_of(got, s) for s in sources] == [data[10:15], data[40:47], data[60:61]]
