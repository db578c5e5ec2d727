"""The transform pool: fetch raw images, render their variants, hand batches to upload."""

from __future__ import annotations

from typing import Any

from common.jobs import lookup_images
from common.jobspec import JobSpec
from common.ledger import Ticket, open_chunk
from common.transform import batch_by_bytes, transform_images
from workers.base import StageTask
from workers.celery_app import app
from workers.routes import TRANSFORM, UPLOAD, queue_of


@app.task(base=StageTask, bind=True, name=TRANSFORM)
def transform_chunk(self: StageTask, spec_message: dict[str, Any], ticket_message: dict[str, Any]) -> int:
    """Render the items of one chunk that are not done yet; returns how many went on to upload."""
    spec = JobSpec.from_message(spec_message)
    ticket = Ticket.from_message(ticket_message)
    chunk = self.ledger(open_chunk, ticket, self.settings.chunk_lease_s)
    if chunk is None:
        return 0  # finished, dispatched again since, or its job stopped
    raw_bucket = self.settings.raw_bucket
    result = transform_images(
        spec,
        chunk.image_ids,
        self.ledger(lookup_images, chunk.image_ids),
        lambda keys: self.store.get_many(raw_bucket, keys),
        chunk.done,
    )
    if result.failures:
        self.record(spec, ticket, result.failures)
    for batch in batch_by_bytes(result.outputs, self.settings.message_byte_budget):
        if not self.wait_for_room(queue_of(UPLOAD), ticket):
            return 0
        self.hand_off(UPLOAD, [spec_message, ticket_message, [output.to_message() for output in batch]])
    return len(result.outputs)
