"""The upload pool (I/O-bound: run it with `--pool threads`): store outputs, hand on to inference."""

from __future__ import annotations

from typing import Any

from common.inference import refs_for
from common.jobspec import JobSpec
from common.transform import Output
from common.upload import upload_outputs
from workers.base import StageTask
from workers.celery_app import app
from workers.routes import INFERENCE, UPLOAD


class UploadTask(StageTask):
    def items_of(self, spec: JobSpec, payload: Any) -> list[tuple[int, int]]:
        return [(output["image_id"], output["variant"]) for output in payload]


@app.task(base=UploadTask, bind=True, name=UPLOAD)
def upload_batch(self: UploadTask, spec_message: dict[str, Any], messages: list[dict[str, Any]]) -> int:
    """Upload one batch of outputs; returns how many were stored."""
    spec = JobSpec.from_message(spec_message)
    outputs = [Output.from_message(message) for message in messages]
    results = upload_outputs(self.store, self.settings.output_bucket, spec, outputs)
    self.record(spec, results)
    if spec.model:
        refs = refs_for(spec, outputs, results, self.settings.raw_bucket)
        self.app.send_task(INFERENCE, args=[spec_message, [ref.to_message() for ref in refs]])
    return len(results)
