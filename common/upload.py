"""The upload stage: put rendered outputs under the job's prefix."""

from __future__ import annotations

from collections.abc import Sequence

from common.images import ENCODINGS
from common.jobspec import JobSpec, output_key
from common.ledger import ItemResult
from common.storage import ObjectStore
from common.transform import Output


def upload_outputs(
    store: ObjectStore, bucket: str, spec: JobSpec, outputs: Sequence[Output]
) -> list[ItemResult]:
    """Store each output at its deterministic key; rerunning overwrites with the same bytes. The
    results say `done`: with a model, inference records the item's final result instead."""
    results = []
    for output in outputs:
        key = output_key(spec.job_id, output.image_id, output.variant, output.extension, spec.key_layout)
        store.put(
            bucket,
            key,
            output.data,
            content_type=ENCODINGS[output.image_format][1],
            metadata={"job-id": spec.job_id, "image-id": str(output.image_id)},
        )
        results.append(
            ItemResult(
                output.image_id, output.variant, output.slot, "done", output_uri=f"s3://{bucket}/{key}"
            )
        )
    return results
