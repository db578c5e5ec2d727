"""The transform stage: fetch each selected image's raw bytes and render its variants."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
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
    keep_raw: bool = False,
    before_each: Callable[[int], None] | None = None,
) -> TransformResult:
    """Render every variant of every id whose item is not in the `done` bitmap; a bad image
    fails its items, not the chunk.

    Raw objects are fetched together; a transient storage error is raised so that the task
    retries the chunk. `keep_raw` keeps each rendered image's raw bytes (for a model that reads
    raws from a shard, so that nothing fetches them twice). `before_each(image_id)` is called
    before each image is decoded.
    """
    pipeline = Pipeline.from_spec(spec.augment)
    todo = [
        (position, image_id, wanted_variants(spec, position, done))
        for position, image_id in enumerate(image_ids)
    ]
    todo = [entry for entry in todo if entry[2]]
    sources = [entry.source for entry in (index.get(i) for _, i, _ in todo) if entry and entry.source]
    fetched = fetch_many(list(dict.fromkeys(sources)))
    result = TransformResult()
    for position, image_id, variants in todo:
        if before_each is not None:
            before_each(image_id)
        try:
            source, data, etag = raw_bytes(image_id, index, fetched)
            rendered = list(
                render_variants(spec, pipeline, position, image_id, variants, source.locator, data)
            )
            result.outputs.extend(rendered)  # all of an image's variants, or none
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
) -> Iterator[Output]:
    """Some variants of one image: the source bytes where untouched, else augmented and encoded."""
    pixels = None
    for variant in variants:
        slot = spec.slot(position, variant)
        if spec.is_passthrough(variant):
            yield Output(image_id, variant, slot, data, sniff_format(data), source)
            continue
        if pixels is None:
            pixels = decode(data)
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
