"""What a job asks for: carried in every task message and stored with the job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from common.ledger import ItemRows

InferOn = Literal["raw", "augmented"]


@dataclass(frozen=True)
class JobSpec:
    """A job's normalised options; `to_message()` is what travels through the broker."""

    job_id: str
    variants: int = 1
    seed: int = 0
    augment: list[dict[str, Any]] = field(default_factory=list)  # normalised ops, empty = none
    keep_original: bool = False  # variant 0 is the untouched original
    image_format: str | None = None  # None: keep the source format
    quality: int = 90
    model: str | None = None  # path or s3:// URI; None = no inference stage
    infer_on: InferOn = "augmented"
    top_k: int = 5
    item_rows: ItemRows = "all"  # job_items rows for every item, or for failures only

    def slot(self, index: int, variant: int) -> int:
        """An item's position in its chunk: image index x variants + variant."""
        return index * self.variants + variant

    def to_message(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> JobSpec:
        """Rebuild from `to_message()`'s dict."""
        return cls(**message)

    def is_passthrough(self, variant: int) -> bool:
        """Whether this variant is the source bytes unchanged."""
        return (self.keep_original and variant == 0) or (not self.augment and self.image_format is None)


def output_key(job_id: str, image_id: int, variant: int, extension: str) -> str:
    """The deterministic object key of one output: `{job_id}/{image_id}-{variant}{ext}`."""
    return f"{job_id}/{image_id}-{variant}{extension}"
