"""The inference stage: fetch each item's image, classify the batch, return item results."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache, partial
from typing import Any

import numpy as np

from common.augment.sizing import with_margin
from common.errors import PermanentError, QuarryError
from common.images import decode
from common.jobspec import JobSpec
from common.ledger import ItemResult
from common.model import Classifier
from common.shards import Shard
from common.transform import Output

SHARD_BATCH = 64  # images decoded and classified at once when a shard is classified
DECODING_THREADS_MAX = 4


@cache
def decoding_pool() -> ThreadPoolExecutor:
    """This process's threads for decoding and fitting a batch's images, one per CPU it may use
    (at most 4), as onnxruntime's own threads: OpenCV releases the GIL, so the model waits
    for the slowest image instead of the sum of them. Made on first use, in the worker process."""
    threads = min(DECODING_THREADS_MAX, len(os.sched_getaffinity(0)))
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")


Decoder = Callable[[bytes | QuarryError], "np.ndarray | PermanentError"]


def decoded(
    data: bytes | QuarryError, floor: tuple[int, int] | None = None, max_pixels: int | None = None
) -> np.ndarray | PermanentError:
    """The pixels of one image, or why it has none; a transient storage error is raised."""
    if isinstance(data, PermanentError):
        return data
    if isinstance(data, QuarryError):
        raise data  # transient or configuration: the task retries
    try:
        return decode(data, floor, max_pixels)
    except PermanentError as exc:
        return exc


def model_decoder(classifier: Classifier, exact: bool, max_pixels: int) -> Decoder:
    """How the model's images are decoded: JPEGs no larger than 1.5 times its input on each
    side (common/augment/sizing.py), or in full with `exact`."""
    preprocess = classifier.info.preprocess
    floor = None if exact else with_margin((preprocess.width, preprocess.height))
    return partial(decoded, floor=floor, max_pixels=max_pixels)


@dataclass(frozen=True)
class ItemRef:
    """An item to classify and the object holding its pixels."""

    image_id: int
    variant: int
    slot: int
    image_uri: str  # the locator of what the model reads (raw or augmented; common.sources)
    output_uri: str  # the item's uploaded output

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ItemRef:
        return cls(**message)


def refs_for(spec: JobSpec, outputs: Sequence[Output], results: Sequence[ItemResult]) -> list[ItemRef]:
    """What the inference stage reads for each uploaded output: the output or its raw source."""
    refs = []
    for output, result in zip(outputs, results, strict=True):
        output_uri = result.output_uri or ""
        source = output.source if spec.infer_on == "raw" else output_uri
        refs.append(ItemRef(output.image_id, output.variant, output.slot, source, output_uri))
    return refs


def infer_items(
    classifier: Classifier,
    refs: Sequence[ItemRef],
    fetch_many: Callable[[list[str]], dict[str, bytes | QuarryError]],
    top_k: int,
    decoder: Decoder = decoded,
) -> list[ItemResult]:
    """Classify every item in one batch; an unreadable image fails alone, a transient storage
    error is raised for the task to retry."""
    fetched = fetch_many([ref.image_uri for ref in refs])
    pool = decoding_pool()
    results: list[ItemResult] = []
    ready: list[tuple[ItemRef, np.ndarray]] = []
    for ref, image in zip(refs, pool.map(decoder, [fetched[ref.image_uri] for ref in refs]), strict=True):
        if isinstance(image, PermanentError):
            results.append(
                ItemResult(
                    ref.image_id, ref.variant, ref.slot, "failed", ref.output_uri, error=f"inference: {image}"
                )
            )
        else:
            ready.append((ref, image))
    predictions = classifier.predict([image for _, image in ready], top_k, pool.map)
    for (ref, _), prediction in zip(ready, predictions, strict=True):
        results.append(
            ItemResult(
                ref.image_id,
                ref.variant,
                ref.slot,
                "done",
                ref.output_uri,
                label=prediction.label,
                score=prediction.score,
                top_k=prediction.top_k,
            )
        )
    return results


def classify_shard(
    classifier: Classifier, shard: Shard, infer_on: str, top_k: int, decoder: Decoder = decoded
) -> Shard:
    """The final shard: each rendered sample's record gains the model's label, score and top-k
    (from its own pixels, or its raw image's with `infer_on="raw"`, classified once per image);
    an image the model cannot read fails alone. The staging-only raws are dropped."""
    pending = [sample for sample in shard.samples if sample.image is not None]
    sources: dict[object, bytes] = {}
    for sample in pending:
        if infer_on == "raw":
            sources.setdefault(sample.image_id, shard.raws[sample.image_id][1])
        else:
            sources[sample.key] = sample.image  # type: ignore[assignment]
    predictions: dict[object, Any] = {}
    names = list(sources)
    pool = decoding_pool()
    for start in range(0, len(names), SHARD_BATCH):
        ready: list[tuple[object, np.ndarray]] = []
        batch_names = names[start : start + SHARD_BATCH]
        images = pool.map(decoder, [sources[name] for name in batch_names])
        for name, image in zip(batch_names, images, strict=True):
            if isinstance(image, PermanentError):
                predictions[name] = f"inference: {image}"
            else:
                ready.append((name, image))
        batch = classifier.predict([image for _, image in ready], top_k, pool.map)
        predictions.update((name, p) for (name, _), p in zip(ready, batch, strict=True))
    for sample in pending:
        prediction = predictions[sample.image_id if infer_on == "raw" else sample.key]
        if isinstance(prediction, str):
            sample.record["error"] = prediction  # the rendered image stays, as in `files` output
        else:
            sample.record.update(
                label=prediction.label, score=round(prediction.score, 5), top_k=prediction.top_k
            )
    return Shard(samples=shard.samples)
