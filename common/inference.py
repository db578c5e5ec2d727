"""The inference stage: fetch each item's image, classify the batch, return item results."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache, partial
from typing import Any

import numpy as np

from common.augment.sizing import with_margin
from common.errors import PermanentError, QuarryError
from common.images import decode
from common.jobspec import JobSpec
from common.ledger import ItemResult
from common.model import Classifier, Prediction
from common.outputs import OutputCache, image_digest, no_cache, predict_once
from common.shards import Shard
from common.transform import Output

MODEL_BATCH = 64  # images decoded and classified at once: memory does not grow with a message
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


@dataclass
class Inferred:
    """A batch's item results, and the embeddings of the images the model read as stored."""

    results: list[ItemResult]
    embeddings: list[tuple[int, list[float], bytes]] = field(default_factory=list)  # id, vector, digest


def as_stored(spec: JobSpec) -> Callable[[int], bool]:
    """Whether the model reads a variant's image as stored (its embedding is the image's)."""
    return lambda variant: spec.infer_on == "raw" or spec.is_passthrough(variant)


def run_model(
    classifier: Classifier, sources: Mapping[Any, bytes | QuarryError], top_k: int, decoder: Decoder
) -> Callable[[list[Hashable]], dict[Hashable, Prediction | str]]:
    """The model over some of `sources`: a Prediction for each, or why its image has none; a
    transient storage error is raised (the task retries)."""

    def run(keys: list[Hashable]) -> dict[Hashable, Prediction | str]:
        pool = decoding_pool()
        outputs: dict[Hashable, Prediction | str] = {}
        ready: list[tuple[Hashable, np.ndarray]] = []
        for key, image in zip(keys, pool.map(decoder, [sources[key] for key in keys]), strict=True):
            if isinstance(image, PermanentError):
                outputs[key] = f"inference: {image}"
            else:
                ready.append((key, image))
        predictions = classifier.predict([image for _, image in ready], top_k, pool.map)
        outputs.update((key, p) for (key, _), p in zip(ready, predictions, strict=True))
        return outputs

    return run


def predict_batches(
    keys: list[Hashable],
    digests: Mapping[Hashable, bytes],
    cache: OutputCache,
    model: Callable[[list[Hashable]], dict[Hashable, Any]],
) -> tuple[dict[Hashable, Any], set[Hashable]]:
    """predict_once over `keys`, MODEL_BATCH at a time: each output, and the keys the model ran on."""
    outputs: dict[Hashable, Any] = {}
    inferred: set[Hashable] = set()
    for start in range(0, len(keys), MODEL_BATCH):
        batch, ran = predict_once(keys[start : start + MODEL_BATCH], digests, cache, model)
        outputs.update(batch)
        inferred |= ran
    return outputs, inferred


def digests_of(sources: Mapping[Any, bytes | QuarryError]) -> dict[Hashable, bytes]:
    return {key: image_digest(data) for key, data in sources.items() if not isinstance(data, QuarryError)}


def infer_items(
    classifier: Classifier,
    refs: Sequence[ItemRef],
    fetch_many: Callable[[list[str]], dict[str, bytes | QuarryError]],
    top_k: int,
    decoder: Decoder = decoded,
    cache: OutputCache | None = None,
    stored: Callable[[int], bool] = lambda variant: False,
) -> Inferred:
    """Classify every item of one message (each image once, MODEL_BATCH at a time; from `cache`
    where the model already read the same bytes); an unreadable image fails alone, a transient
    storage error is raised for the task to retry. Items whose variant is `stored` give their
    image's embedding."""
    fetched = fetch_many([ref.image_uri for ref in refs])
    cache = cache or OutputCache(no_cache, top_k, len(classifier.info.labels))
    uris: list[Hashable] = list(dict.fromkeys(ref.image_uri for ref in refs))
    digests = digests_of(fetched)
    outputs, inferred = predict_batches(uris, digests, cache, run_model(classifier, fetched, top_k, decoder))
    run = Inferred([])
    for ref in refs:
        output = outputs[ref.image_uri]
        if isinstance(output, str):
            run.results.append(
                ItemResult(ref.image_id, ref.variant, ref.slot, "failed", ref.output_uri, error=output)
            )
            continue
        ran = ref.image_uri in inferred
        inferred.discard(ref.image_uri)  # counted once, on its first item
        run.results.append(
            ItemResult(
                ref.image_id,
                ref.variant,
                ref.slot,
                "done",
                ref.output_uri,
                label=output.label,
                score=output.score,
                top_k=output.top_k,
                inferred=ran,
            )
        )
        if output.embedding is not None and stored(ref.variant):
            run.embeddings.append((ref.image_id, output.embedding, digests[ref.image_uri]))
    return run


def classify_shard(
    classifier: Classifier,
    shard: Shard,
    infer_on: str,
    top_k: int,
    decoder: Decoder = decoded,
    cache: OutputCache | None = None,
    stored: Callable[[int], bool] = lambda variant: False,
) -> tuple[Shard, Inferred]:
    """The final shard: each rendered sample's record gains the model's label, score and top-k
    (from its own pixels, or its raw image's with `infer_on="raw"`, classified once per image; from
    `cache` where the model already read the same bytes); an image the model cannot read fails
    alone. The staging-only raws are dropped. Also which samples' items the model ran on
    (`Inferred.results` holds only those, as done) and the embeddings of `stored` variants."""
    pending = [sample for sample in shard.samples if sample.image is not None]
    sources: dict[Hashable, bytes | QuarryError] = {}
    for sample in pending:
        if infer_on == "raw":
            sources.setdefault(sample.image_id, shard.raws[sample.image_id][1])
        else:
            sources[sample.key] = sample.image  # type: ignore[assignment]
    cache = cache or OutputCache(no_cache, top_k, len(classifier.info.labels))
    digests = digests_of(sources)
    outputs, inferred = predict_batches(
        list(sources), digests, cache, run_model(classifier, sources, top_k, decoder)
    )
    run = Inferred([])
    for sample in pending:
        name = sample.image_id if infer_on == "raw" else sample.key
        prediction = outputs[name]
        if isinstance(prediction, str):
            sample.record["error"] = prediction  # the rendered image stays, as in `files` output
            continue
        sample.record.update(label=prediction.label, score=round(prediction.score, 5), top_k=prediction.top_k)
        if name in inferred:
            inferred.discard(name)
            run.results.append(
                ItemResult(sample.image_id, sample.variant, sample.slot, "done", inferred=True)
            )
        if prediction.embedding is not None and stored(sample.variant):
            run.embeddings.append((sample.image_id, prediction.embedding, digests[name]))
    return Shard(samples=shard.samples), run
