"""The transform stage: fetch each selected image's raw bytes and render its variants."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from common.augment import Pipeline
from common.datasets import Location
from common.errors import PermanentError, QuarryError
from common.images import ENCODINGS, decode, encode, sniff_format
from common.jobspec import JobSpec
from common.ledger import ItemResult, OpenChunk
from common.sources import Source

NO_IMAGE = "no image"


@dataclass(frozen=True)
class Output:
    """One rendered variant, ready to upload."""

    image_id: int
    variant: int
    slot: int  # the item's position in its chunk
    data: bytes
    image_format: str
    source: str  # the locator of the raw bytes it was made from (common.sources)

    @property
    def extension(self) -> str:
        return ENCODINGS[self.image_format][0]

    def to_message(self) -> dict[str, Any]:
        """A broker-safe dict (kombu's JSON carries the bytes as base64)."""
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Output:
        return cls(**message)


@dataclass
class TransformResult:
    """Rendered outputs and the items that failed."""

    outputs: list[Output] = field(default_factory=list)
    failures: list[ItemResult] = field(default_factory=list)
    raws: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # id -> (locator, bytes), if kept
    etags: dict[int, str] = field(default_factory=dict)  # ETags first read from unpinned sources


ImageIndex = dict[int, Location]
Fetched = dict[Source, tuple[bytes, str] | QuarryError]


def wanted_variants(spec: JobSpec, position: int, done: int) -> list[int]:
    """The variants of the image at `position` in its chunk whose items are not done yet."""
    return [v for v in range(spec.variants) if not (done >> spec.slot(position, v)) & 1]


def given_up_suspect(spec: JobSpec, chunk: OpenChunk, done: int, max_attempts: int) -> list[ItemResult]:
    """On a chunk's last attempt, the failed items of the image a lost worker process was
    rendering (common/liveness.py), not rendered again: one image that kills its worker must not
    take the rest of its chunk down on every attempt."""
    if chunk.suspect is None or chunk.attempts < max_attempts or chunk.suspect not in chunk.image_ids:
        return []
    position = chunk.image_ids.index(chunk.suspect)
    error = (
        f"transform: its worker process was lost while rendering this image"
        f" ({chunk.attempts - 1} of {max_attempts} attempts); not tried again"
    )
    return [
        ItemResult(chunk.suspect, v, spec.slot(position, v), "failed", error=error)
        for v in wanted_variants(spec, position, done)
    ]


def transform_images(
    spec: JobSpec,
    image_ids: Sequence[int],
    index: ImageIndex,
    fetch_many: Callable[[list[Source]], Fetched],
    done: int = 0,
    *,
    bytes_in_flight: int,
    max_pixels: int,
    keep_raw: bool = False,
    before_each: Callable[[int], None] | None = None,
) -> Iterator[TransformResult]:
    """Render every variant of every id whose item is not in the `done` bitmap; a bad image
    fails its items, not the chunk.

    The chunk streams through in groups of at most half of `bytes_in_flight` raw bytes (sizes
    the catalog does not know are guessed from the groups before): each group's raw objects are
    fetched together while the group before is rendered (so reads and decoding overlap and at
    most two groups are held), rendered one image at a time and yielded as one result, then let
    go. A transient storage error is raised so that the task retries the chunk. `keep_raw` keeps each
    rendered image's raw bytes (for a model that reads raws from a shard, so that nothing
    fetches them twice). `before_each(image_id)` is called before each image is decoded. An
    image whose header declares more than `max_pixels` fails alone, undecoded.
    """
    pipeline = Pipeline.from_spec(spec.augment)
    todo = [
        (position, image_id, wanted_variants(spec, position, done))
        for position, image_id in enumerate(image_ids)
    ]
    pending = [entry for entry in todo if entry[2]]
    group_bytes = max(1, bytes_in_flight // 2)  # one group rendered while the next is read
    read_bytes = read_count = 0

    def next_group() -> tuple[list[Todo], Future[Fetched] | None]:
        nonlocal pending
        if not pending:
            return [], None
        guess = read_bytes // read_count if read_count else FIRST_GUESS_BYTES
        group, pending = take_by_bytes(pending, partial(raw_size, index, guess=guess), group_bytes)
        sources = [entry.source for entry in (index.get(i) for _, i, _ in group) if entry and entry.source]
        return group, reader.submit(fetch_many, list(dict.fromkeys(sources)))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as reader:
        group, reading = next_group()
        while reading is not None:
            fetched = reading.result()  # a transient storage error is raised here
            got = [value[0] for value in fetched.values() if isinstance(value, tuple)]
            read_bytes, read_count = read_bytes + sum(map(len, got)), read_count + len(got)
            following, reading = next_group()
            yield render_group(spec, pipeline, group, index, fetched, max_pixels, keep_raw, before_each)
            group = following
            del fetched, got


FIRST_GUESS_BYTES = 1024 * 1024  # an unknown raw size before any is read: a large photograph's
Todo = tuple[int, int, list[int]]  # (position in the chunk, image id, variants to render)


def raw_size(index: ImageIndex, todo: Todo, guess: int) -> int:
    """The bytes an image's read brings: its length where the catalog has it, else `guess`."""
    entry = index.get(todo[1])
    if entry is None or entry.source is None:
        return 0
    return entry.source.length if entry.source.length is not None else guess


def take_by_bytes(
    todo: list[Todo], size_of: Callable[[Todo], int], budget: int
) -> tuple[list[Todo], list[Todo]]:
    """The first entries whose sizes add up to at most `budget` (at least one), and the rest."""
    total = 0
    for count, entry in enumerate(todo):
        total += size_of(entry)
        if count and total > budget:
            return todo[:count], todo[count:]
    return todo, []


def render_group(
    spec: JobSpec,
    pipeline: Pipeline,
    group: list[Todo],
    index: ImageIndex,
    fetched: Fetched,
    max_pixels: int,
    keep_raw: bool,
    before_each: Callable[[int], None] | None,
) -> TransformResult:
    """The outputs and failures of one group of fetched images."""
    result = TransformResult()
    for position, image_id, variants in group:
        if before_each is not None:
            before_each(image_id)
        try:
            source, data, etag = raw_bytes(image_id, index, fetched)
            variant_outputs = render_variants(
                spec, pipeline, position, image_id, variants, source.locator, data, max_pixels
            )
            result.outputs.extend(list(variant_outputs))  # all of an image's variants, or none
            if source.etag is None and source.offset is None:
                result.etags[image_id] = etag
            if keep_raw:
                result.raws[image_id] = (source.locator, data)
        except PermanentError as exc:
            result.failures.extend(
                ItemResult(image_id, v, spec.slot(position, v), "failed", error=f"transform: {exc}")
                for v in variants
            )
    return result


def merged(results: Iterable[TransformResult]) -> TransformResult:
    """One result of a whole chunk's groups (a shard is written whole)."""
    whole = TransformResult()
    for result in results:
        whole.outputs.extend(result.outputs)
        whole.failures.extend(result.failures)
        whole.raws.update(result.raws)
        whole.etags.update(result.etags)
    return whole


def raw_bytes(image_id: int, index: ImageIndex, fetched: Fetched) -> tuple[Source, bytes, str]:
    """The source, bytes and ETag of an image; PermanentError when there are none."""
    entry = index.get(image_id)
    if entry is None:
        raise PermanentError(NO_IMAGE)
    if entry.source is None:
        raise PermanentError(f"bad image: {entry.error}")
    got = fetched[entry.source]
    if isinstance(got, QuarryError):
        raise got  # permanent: the item fails; transient or configuration: the task retries
    data, etag = got
    return entry.source, data, etag


def render_variants(
    spec: JobSpec,
    pipeline: Pipeline,
    position: int,
    image_id: int,
    variants: Sequence[int],
    source: str,
    data: bytes,
    max_pixels: int,
) -> Iterator[Output]:
    """Some variants of one image: the source bytes where untouched, else augmented and encoded
    (a JPEG decoded no larger than `spec.decode_floor` keeps)."""
    pixels = None
    for variant in variants:
        slot = spec.slot(position, variant)
        if spec.is_passthrough(variant):
            yield Output(image_id, variant, slot, data, sniff_format(data), source)
            continue
        if pixels is None:
            floor = spec.decode_floor
            pixels = decode(data, (floor[0], floor[1]) if floor else None, max_pixels)
        augmented = pipeline.apply(pixels, seed=(spec.seed, image_id, variant))
        image_format = spec.image_format or "jpeg"
        encoded = encode(augmented, image_format, spec.quality)
        yield Output(image_id, variant, slot, encoded, image_format, source)


def batch_by_bytes(outputs: Sequence[Output], budget: int) -> Iterator[list[Output]]:
    """Split outputs into batches whose payload stays under `budget` bytes (one output may exceed
    it alone: it then travels alone)."""
    batch: list[Output] = []
    size = 0
    for output in outputs:
        if batch and size + len(output.data) > budget:
            yield batch
            batch, size = [], 0
        batch.append(output)
        size += len(output.data)
    if batch:
        yield batch
