"""The transform pool: fetch raw images, render their variants, hand batches to upload."""

from __future__ import annotations

from typing import Any

from common.jobs import lookup_images
from common.jobspec import JobSpec
from common.transform import batch_by_bytes, transform_images
from workers.base import StageTask
from workers.celery_app import app
from workers.routes import TRANSFORM, UPLOAD


class TransformTask(StageTask):
    def items_of(self, spec: JobSpec, payload: Any) -> list[tuple[int, int]]:
        return [(image_id, variant) for image_id in payload for variant in range(spec.variants)]


@app.task(base=TransformTask, bind=True, name=TRANSFORM)
def transform_chunk(self: TransformTask, spec_message: dict[str, Any], image_ids: list[int]) -> int:
    """Render one chunk; returns how many outputs went on to upload."""
    spec = JobSpec.from_message(spec_message)
    raw_bucket = self.settings.raw_bucket
    result = transform_images(
        spec,
        image_ids,
        lookup_images(self.db, image_ids),
        lambda keys: self.store.get_many(raw_bucket, keys),
    )
    self.record(spec, result.failures)
    for batch in batch_by_bytes(result.outputs, self.settings.message_byte_budget):
        self.app.send_task(UPLOAD, args=[spec_message, [output.to_message() for output in batch]])
    return len(result.outputs)
