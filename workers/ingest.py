"""Ingest units on the transform pool: each registers one manifest file (or Parquet row group) or
one tar shard, recorded in the ledger like a chunk (common/ingest/units.py)."""

from __future__ import annotations

from typing import Any

from common.ledger import Ticket, open_chunk
from workers.base import StageTask
from workers.celery_app import app
from workers.routes import INGEST


@app.task(base=StageTask, bind=True, name=INGEST)
def ingest_unit(self: StageTask, plan_message: dict[str, Any], ticket_message: dict[str, Any]) -> int:
    """Register the unit the ticket names; returns the catalog rows it added."""
    from common.ingest.units import IngestPlan, run_unit  # the ingest code loads where it runs

    plan = IngestPlan.from_message(plan_message)
    ticket = Ticket.from_message(ticket_message)
    if self.ledger(open_chunk, ticket, self.settings.chunk_lease_s) is None:
        return 0  # registered, dispatched again since, or its ingest was cancelled
    return self.ledger(run_unit, self.store, plan, ticket, self.settings.chunk_lease_s)
