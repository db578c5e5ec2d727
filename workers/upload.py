"""The upload pool (I/O-bound: run it with `--pool threads`): store outputs, hand on to inference."""

from __future__ import annotations

from typing import Any

from common.inference import refs_for
from common.jobspec import JobSpec
from common.ledger import Ticket
from common.transform import Output
from common.upload import upload_outputs
from workers.base import StageTask
from workers.celery_app import app
from workers.routes import INFERENCE, UPLOAD


@app.task(base=StageTask, bind=True, name=UPLOAD)
def upload_batch(
    self: StageTask,
    spec_message: dict[str, Any],
    ticket_message: dict[str, Any],
    messages: list[dict[str, Any]],
) -> int:
    """Upload one batch of outputs; returns how many were stored."""
    spec = JobSpec.from_message(spec_message)
    ticket = Ticket.from_message(ticket_message)
    if not self.is_live(ticket):
        return 0
    outputs = [Output.from_message(message) for message in messages]
    results = upload_outputs(self.store, self.settings.output_bucket, spec, outputs)
    if spec.model:  # the item is done when inference has classified it
        refs = refs_for(spec, outputs, results)
        self.hand_off(INFERENCE, [spec_message, ticket_message, [ref.to_message() for ref in refs]])
    else:
        self.record(spec, ticket, results)
    return len(results)
