import threading
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pytest

from common.datasets import Location
from common.errors import ObjectMissing, StorageUnavailable
from common.jobspec import JobSpec
from common.sources import Source
from common.transform import Fetched, Output, TransformResult, batch_by_bytes, merged, transform_images
from tests.photographs import bomb

_, JPEG = cv2.imencode(".jpg", np.full((8, 6, 3), 100, dtype=np.uint8))
RAW = JPEG.tobytes()
ONE = Source("s3://raw/shard.tar", 512, len(RAW), '"etag"')
INDEX = {
    1: Location(ONE),
    2: Location(None, "empty file (0 bytes)"),
    3: Location(Source("s3://elsewhere/3.jpg")),  # deleted from its bucket
}


def render_all(
    spec: JobSpec,
    ids: list[int],
    index: dict[int, Location],
    fetch: Callable[[list[Source]], Fetched],
    **options: Any,
) -> TransformResult:
    """A whole chunk's result, in groups of the default byte budget."""
    return merged(
        transform_images(spec, ids, index, fetch, bytes_in_flight=64 << 20, max_pixels=10**8, **options)
    )


def fetch_many(sources: list[Source]) -> Fetched:
    return {s: (RAW, '"etag"') if s == ONE else ObjectMissing(f"source vanished: {s.uri}") for s in sources}


def test_each_bad_id_fails_alone_and_good_ones_pass_through() -> None:
    spec = JobSpec(job_id="j", variants=2)
    result = render_all(spec, [1, 2, 3, 4], INDEX, fetch_many)
    assert [(o.image_id, o.variant) for o in result.outputs] == [(1, 0), (1, 1)]
    assert all(o.data == RAW and o.image_format == "jpeg" for o in result.outputs)
    errors = {(f.image_id, f.variant): f.error for f in result.failures}
    assert errors == {
        (2, 0): "transform: bad image: empty file (0 bytes)",
        (2, 1): "transform: bad image: empty file (0 bytes)",
        (3, 0): "transform: source vanished: s3://elsewhere/3.jpg",
        (3, 1): "transform: source vanished: s3://elsewhere/3.jpg",
        (4, 0): "transform: no image",
        (4, 1): "transform: no image",
    }


def test_keep_original_and_augmented_variants() -> None:
    spec = JobSpec(job_id="j", variants=2, keep_original=True, augment=[], image_format="png")
    outputs = render_all(spec, [1], INDEX, fetch_many).outputs
    assert outputs[0].data == RAW and outputs[1].image_format == "png"


def test_an_image_fails_whole_even_when_one_variant_could_pass_through() -> None:
    spec = JobSpec(
        job_id="j", variants=2, keep_original=True, augment=[{"op": "hflip", "p": 1.0, "args": {}}]
    )

    def corrupt(sources: list[Source]) -> Fetched:
        return dict.fromkeys(sources, (b"\xff\xd8 not a jpeg", '"etag"'))

    result = render_all(spec, [1], INDEX, corrupt)
    assert result.outputs == []
    assert [(f.variant, f.error) for f in result.failures] == [
        (0, "transform: not a decodable image (13 bytes)"),
        (1, "transform: not a decodable image (13 bytes)"),
    ]


def test_a_transient_storage_error_fails_the_chunk_for_a_retry() -> None:
    def unavailable(sources: list[Source]) -> Fetched:
        return {source: StorageUnavailable("S3 did not answer") for source in sources}

    with pytest.raises(StorageUnavailable):
        render_all(JobSpec(job_id="j"), [1], INDEX, unavailable)


@pytest.mark.parametrize("budget", [10, 25, 1000])
def test_batches_stay_under_the_byte_budget(budget: int) -> None:
    outputs = [Output(i, 0, i, b"x" * 10, "jpeg", "k") for i in range(7)]
    batches = list(batch_by_bytes(outputs, budget))
    assert [o for batch in batches for o in batch] == outputs
    assert all(sum(len(o.data) for o in batch) <= max(budget, 10) for batch in batches)
    assert len(batches) == -(-70 // max(10, budget - budget % 10))


def test_output_survives_the_broker_round_trip() -> None:
    from kombu.utils.json import dumps, loads

    output = Output(5, 1, 3, bytes(range(256)), "png", "images/5.jpg")
    assert Output.from_message(loads(dumps(output.to_message()))) == output


def test_items_already_done_are_not_rendered_again() -> None:
    spec = JobSpec(job_id="j", variants=2)
    # slots: image 1 -> 0, 1; image 2 -> 2, 3. Slot 1 (image 1, variant 1) is done.
    result = render_all(spec, [1, 3], INDEX, fetch_many, done=0b0010)
    assert [(o.image_id, o.variant, o.slot) for o in result.outputs] == [(1, 0, 0)]
    assert [(f.image_id, f.variant, f.slot) for f in result.failures] == [(3, 0, 2), (3, 1, 3)]
    assert render_all(spec, [1], INDEX, fetch_many, done=0b11).outputs == []


def test_an_object_read_without_a_pinned_etag_reports_the_one_it_read() -> None:
    unpinned = Source("s3://elsewhere/1.jpg")
    index = {1: Location(unpinned), 2: Location(ONE)}
    result = render_all(
        JobSpec(job_id="j"), [1, 2], index, lambda sources: dict.fromkeys(sources, (RAW, '"abc"'))
    )
    assert result.etags == {1: '"abc"'}  # pinned from now on; a shard member's ETag is its shard's


def test_a_locator_names_an_object_or_a_byte_range_and_reads_back() -> None:
    assert ONE.locator == f"s3://raw/shard.tar#bytes=512-{512 + len(RAW) - 1}"
    assert Source.from_locator(ONE.locator) == Source("s3://raw/shard.tar", 512, len(RAW))
    assert Source.from_locator("s3://b/k.jpg") == Source("s3://b/k.jpg")


def test_a_chunk_streams_in_groups_within_the_byte_budget() -> None:
    """Each read holds at most half the budget's raw bytes (sizes from the catalog: one group is
    rendered while the next is read), and the groups together give what one pass gives."""
    size = len(RAW)
    index = {i: Location(Source("s3://raw/shard.tar", i * 1000, size)) for i in range(1, 21)}
    reads: list[int] = []

    def counting(sources: list[Source]) -> Fetched:
        reads.append(sum(s.length or 0 for s in sources))
        return dict.fromkeys(sources, (RAW, '"etag"'))

    spec = JobSpec(job_id="j", augment=[{"op": "hflip", "p": 1.0, "args": {}}])
    groups = list(
        transform_images(spec, list(index), index, counting, bytes_in_flight=6 * size, max_pixels=10**8)
    )
    assert reads == [3 * size] * 6 + [2 * size] and len(groups) == 7
    whole = render_all(spec, list(index), index, counting)
    assert [o.data for o in merged(groups).outputs] == [o.data for o in whole.outputs]
    assert [o.image_id for o in whole.outputs] == list(range(1, 21))


def test_the_next_group_is_read_while_one_is_rendered() -> None:
    """While the first group is being used, the second is already read and the third is not:
    reads overlap rendering, and at most two groups' bytes are held."""
    size = len(RAW)
    index = {i: Location(Source("s3://raw/shard.tar", i * 1000, size)) for i in range(1, 7)}
    reads: list[list[int]] = []
    second_read = threading.Event()
    first_released = threading.Event()
    early: list[int] = []  # reads started while the first group was still in use

    def fetch(sources: list[Source]) -> Fetched:
        reads.append([s.offset or 0 for s in sources])
        if len(reads) == 2:
            second_read.set()
        if len(reads) > 2 and not first_released.is_set():
            early.append(len(reads))
        return dict.fromkeys(sources, (RAW, '"etag"'))

    spec = JobSpec(job_id="j", augment=[{"op": "hflip", "p": 1.0, "args": {}}])
    groups = transform_images(spec, list(index), index, fetch, bytes_in_flight=4 * size, max_pixels=10**8)
    first = next(groups)
    assert second_read.wait(10), "the second group was not read while the first was in use"
    assert reads[:2] == [[1000, 2000], [3000, 4000]] and [o.image_id for o in first.outputs] == [1, 2]
    first_released.set()
    assert [o.image_id for g in groups for o in g.outputs] == [3, 4, 5, 6] and len(reads) == 3
    assert early == [], "a third group was read while the first was still in use"


def test_a_failed_read_ahead_is_raised_to_the_task() -> None:
    """A transient error of the group read ahead surfaces when that group is reached."""
    index = {i: Location(Source("s3://raw/shard.tar", i * 1000, len(RAW))) for i in range(1, 5)}

    def fetch(sources: list[Source]) -> Fetched:
        if sources[0].offset == 3000:
            raise StorageUnavailable("S3 unreachable")
        return dict.fromkeys(sources, (RAW, '"etag"'))

    spec = JobSpec(job_id="j", augment=[{"op": "hflip", "p": 1.0, "args": {}}])
    groups = transform_images(spec, list(index), index, fetch, bytes_in_flight=4 * len(RAW), max_pixels=10**8)
    assert [o.image_id for o in next(groups).outputs] == [1, 2]
    with pytest.raises(StorageUnavailable, match="S3 unreachable"):
        next(groups)


def test_unknown_sizes_are_guessed_from_the_group_before() -> None:
    """Objects of their own have no length in the catalog: the first group guesses 1 MiB each,
    the next ones the mean size read so far (groups of half the budget)."""
    index = {i: Location(Source(f"s3://raw/{i}.jpg")) for i in range(1, 201)}
    reads: list[int] = []

    def counting(sources: list[Source]) -> Fetched:
        reads.append(len(sources))
        return dict.fromkeys(sources, (RAW, '"etag"'))

    spec = JobSpec(job_id="j", augment=[{"op": "hflip", "p": 1.0, "args": {}}])
    list(transform_images(spec, list(index), index, counting, bytes_in_flight=8 << 20, max_pixels=10**8))
    assert reads == [4, 196]


def test_an_image_past_the_pixel_limit_fails_alone_undecoded() -> None:
    index = {1: Location(ONE), 2: Location(Source("s3://raw/bomb.jpg"))}

    def fetch(sources: list[Source]) -> Fetched:
        return {s: ((RAW if s == ONE else bomb()), '"etag"') for s in sources}

    spec = JobSpec(job_id="j", augment=[{"op": "hflip", "p": 1.0, "args": {}}])
    result = render_all(spec, [1, 2], index, fetch)
    assert [o.image_id for o in result.outputs] == [1]
    assert [f.error for f in result.failures] == [
        "transform: image too large: 30000×30000 (900,000,000 pixels; IMAGE_MAX_PIXELS is 100,000,000)"
    ]
