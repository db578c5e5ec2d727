"""What a job asks for: carried in every task message and stored with the job."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from common.ledger import ItemRows

INGEST_KIND = "ingest"  # the `kind` of an ingest's spec (common/ingest/units.py): no images to render
InferOn = Literal["raw", "augmented"]
OutputFormat = Literal["files", "webdataset"]
KeyLayout = Literal["flat", "hashed"]


@dataclass(frozen=True)
class JobSpec:
    """A job's normalised options; `to_message()` is what travels through the broker."""

    job_id: str
    dataset: str = "styles"  # the dataset whose ids the job selected (common.datasets)
    variants: int = 1
    seed: int = 0
    augment: list[dict[str, Any]] = field(default_factory=list)  # normalised ops, empty = none
    keep_original: bool = False  # variant 0 is the untouched original
    image_format: str | None = None  # None: keep the source format
    quality: int = 90
    model: str | None = None  # path or s3:// URI; None = no inference stage
    model_name: str | None = None  # what --model was given (`default`): the embeddings' `model`
    model_digest: str | None = None  # sha256 of the model file when the job started (common/outputs.py)
    embedding_dimensions: int | None = None  # the model's embedding output's length, if it has one
    embedding_set: int | None = None  # where its embeddings are recorded (common/embeddings.py)
    infer_on: InferOn = "augmented"
    top_k: int = 5
    item_rows: ItemRows = "all"  # job_items rows for every item, or for failures only
    output: OutputFormat = "files"  # one object per item, or one tar shard per chunk
    key_layout: KeyLayout = "flat"  # files only: `hashed` spreads keys over 256 prefixes
    exact_decode: bool = False  # decode every image in full (else JPEGs no larger than needed)
    decode_floor: list[int] | None = None  # transform: JPEGs keep at least [width, height]; None: full

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

    def decoding(self) -> str:
        """How the transform stage decodes the job's images, in words (`producer run` prints it)."""
        if self.decode_floor is not None:
            width, height = self.decode_floor
            return (
                f"JPEGs decoded at 1/2, 1/4 or 1/8 scale where that keeps at least {width}x{height}"
                " (--exact-decode: in full)"
            )
        if self.exact_decode:
            return "images decoded in full (--exact-decode)"
        return "images decoded in full (no resize or crop shrinks them first)"

    def is_passthrough(self, variant: int) -> bool:
        """Whether this variant is the source bytes unchanged."""
        return (self.keep_original and variant == 0) or (not self.augment and self.image_format is None)


def output_key(job_id: str, image_id: int, variant: int, extension: str, layout: KeyLayout = "flat") -> str:
    """The deterministic object key of one output: `{job_id}/{image_id}-{variant}{ext}`, or with
    `hashed`, `{job_id}/{hh}/{image_id}-{variant}{ext}` where hh (00-ff) comes from the image id,
    so one job's keys spread over 256 prefixes (S3 limits request rates per prefix)."""
    if layout == "hashed":
        spread = hashlib.sha256(str(image_id).encode()).hexdigest()[:2]
        return f"{job_id}/{spread}/{image_id}-{variant}{extension}"
    return f"{job_id}/{image_id}-{variant}{extension}"
