"""The inference stage: fetch each item's image, classify the batch, return item results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.errors import PermanentError, QuarryError
from common.images import decode
from common.jobspec import JobSpec
from common.ledger import ItemResult
from common.model import Classifier
from common.transform import Output


@dataclass(frozen=True)
class ItemRef:
    """An item to classify and the object holding its pixels."""

    image_id: int
    variant: int
    slot: int
    image_uri: str  # what the model reads (raw or augmented)
    output_uri: str  # the item's uploaded output

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ItemRef:
        return cls(**message)


def refs_for(
    spec: JobSpec, outputs: Sequence[Output], results: Sequence[ItemResult], raw_bucket: str
) -> list[ItemRef]:
    """What the inference stage reads for each uploaded output: the output or its raw source."""
    refs = []
    for output, result in zip(outputs, results, strict=True):
        output_uri = result.output_uri or ""
        source = f"s3://{raw_bucket}/{output.source_key}" if spec.infer_on == "raw" else output_uri
        refs.append(ItemRef(output.image_id, output.variant, output.slot, source, output_uri))
    return refs


def infer_items(
    classifier: Classifier,
    refs: Sequence[ItemRef],
    fetch_many: Callable[[list[str]], dict[str, bytes | QuarryError]],
    top_k: int,
) -> list[ItemResult]:
    """Classify every item in one batch; an unreadable image fails alone, a transient storage
    error is raised for the task to retry."""
    fetched = fetch_many([ref.image_uri for ref in refs])
    results: list[ItemResult] = []
    ready: list[tuple[ItemRef, np.ndarray]] = []
    for ref in refs:
        data = fetched[ref.image_uri]
        if isinstance(data, QuarryError) and not isinstance(data, PermanentError):
            raise data
        try:
            if isinstance(data, PermanentError):
                raise data
            ready.append((ref, decode(data)))
        except PermanentError as exc:
            results.append(
                ItemResult(
                    ref.image_id, ref.variant, ref.slot, "failed", ref.output_uri, error=f"inference: {exc}"
                )
            )
    predictions = classifier.predict([image for _, image in ready], top_k)
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
