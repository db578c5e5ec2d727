"""The smallest real worker, for `bench.control_plane`: it takes the dispatcher's transform
messages and records each chunk's items done through the stages' own code (`open_chunk`, then
`StageTask.record`), with no image work, so what is measured is the control plane alone.

Start: celery -A bench.null_worker worker -Q transform --pool prefork --concurrency N
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from common.jobspec import JobSpec
from common.ledger import ItemResult, Ticket, open_chunk
from workers.base import StageTask
from workers.routes import TRANSFORM

app = Celery("quarry-null")
app.config_from_object("workers.celeryconfig")


@app.task(base=StageTask, bind=True, name=TRANSFORM)
def record_chunk(self: StageTask, spec_message: dict[str, Any], ticket_message: dict[str, Any]) -> int:
    """Every item of the chunk done, recorded as transform records items (one call, whole chunk)."""
    spec = JobSpec.from_message(spec_message)
    ticket = Ticket.from_message(ticket_message)
    chunk = self.ledger(open_chunk, ticket, self.settings.chunk_lease_s)
    if chunk is None:
        return 0
    results = [
        ItemResult(image_id, variant, spec.slot(position, variant), "done")
        for position, image_id in enumerate(chunk.image_ids)
        for variant in range(spec.variants)
    ]
    self.record(spec, ticket, results)
    return len(results)
