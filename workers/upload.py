"""The upload pool (I/O-bound: run it with `--pool threads`): store outputs, hand on to inference."""

from __future__ import annotations

from typing import Any

from common.inference import ItemRef
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
        raw_bucket = self.settings.raw_bucket
        refs = [
            ItemRef(
                output.image_id,
                output.variant,
                f"s3://{raw_bucket}/{output.source_key}"
                if spec.infer_on == "raw"
                else result.output_uri or "",
                result.output_uri or "",
            ).to_message()
            for output, result in zip(outputs, results, strict=True)
        ]
        self.app.send_task(INFERENCE, args=[spec_message, refs])
    return len(results)
