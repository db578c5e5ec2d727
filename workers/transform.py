"""The transform pool: fetch raw images, render their variants, hand them on.

`files` output: batches of outputs go to the upload pool. `webdataset` output: the chunk becomes
one tar shard, written here (one PUT instead of one per item); with a model, a staging shard that
the inference pool reads once and finishes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from common.datasets import lookup_catalog, lookup_locations, pin_etags
from common.jobspec import JobSpec
from common.ledger import OpenChunk, Ticket, open_chunk
from common.liveness import mark_rendering
from common.shards import shard_from_transform, shard_key, store_shard, write_tar
from common.transform import TransformResult, batch_by_bytes, given_up_suspect, merged, transform_images
from workers.base import StageTask
from workers.celery_app import app
from workers.routes import INFERENCE_SHARD, TRANSFORM, UPLOAD, queue_of


@app.task(base=StageTask, bind=True, name=TRANSFORM)
def transform_chunk(self: StageTask, spec_message: dict[str, Any], ticket_message: dict[str, Any]) -> int:
    """Render the items of one chunk that are not done yet; returns how many were rendered."""
    started = time.monotonic()
    spec = JobSpec.from_message(spec_message)
    ticket = Ticket.from_message(ticket_message)
    chunk = self.ledger(open_chunk, ticket, self.settings.chunk_lease_s)
    if chunk is None:
        return 0  # finished, dispatched again since, or its job stopped
    if spec.output == "webdataset":
        return write_shard(self, spec, ticket, chunk)
    rendered = 0
    for result in render(self, spec, ticket, chunk, done=chunk.done):
        if result.failures:
            self.record(spec, ticket, result.failures)
        for batch in batch_by_bytes(result.outputs, self.settings.message_byte_budget):
            if not self.wait_for_room(queue_of(UPLOAD), ticket, started):
                return 0
            self.hand_off(UPLOAD, [spec_message, ticket_message, [output.to_message() for output in batch]])
        rendered += len(result.outputs)
    return rendered


def render(
    self: StageTask, spec: JobSpec, ticket: Ticket, chunk: OpenChunk, *, done: int = 0, keep_raw: bool = False
) -> Iterator[TransformResult]:
    """Fetch the chunk's images where they are and render the items not in `done`, in groups of
    at most half of TRANSFORM_BYTES_IN_FLIGHT raw bytes, the next read while one is rendered;
    ETags read from sources registered without one are pinned, so that a later read notices a
    rewrite. A retried chunk is rendered carefully: each image is marked first (the marked image
    of a lost worker process is the chunk's suspect), and on the last attempt a suspect fails
    alone, unrendered."""
    given_up = given_up_suspect(spec, chunk, done, self.settings.chunk_max_attempts)
    careful = chunk.attempts > 1
    groups = transform_images(
        spec,
        chunk.image_ids,
        self.ledger(lookup_locations, spec.dataset, chunk.image_ids),
        self.store.read_many,
        done | sum(1 << item.slot for item in given_up),
        bytes_in_flight=self.settings.transform_bytes_in_flight,
        max_pixels=self.settings.image_max_pixels,
        keep_raw=keep_raw,
        before_each=(lambda image_id: self.ledger(mark_rendering, ticket, image_id)) if careful else None,
    )
    for result in groups:
        result.failures.extend(given_up)
        given_up = []
        if result.etags:
            self.ledger(pin_etags, spec.dataset, result.etags)
        yield result
    if given_up:  # nothing else was left to render: the suspect's failures still go on record
        yield TransformResult(failures=given_up)


def write_shard(self: StageTask, spec: JobSpec, ticket: Ticket, chunk: OpenChunk) -> int:
    """Render every item of the chunk (a shard is rewritten whole, so a rerun writes the same
    bytes) and store it: finished here, or staged for the inference pool."""
    started = time.monotonic()
    bucket = self.settings.output_bucket
    result = merged(render(self, spec, ticket, chunk, keep_raw=bool(spec.model) and spec.infer_on == "raw"))
    shard = shard_from_transform(spec, result, self.ledger(lookup_catalog, spec.dataset, chunk.image_ids))
    if not spec.model:
        self.record(
            spec,
            ticket,
            store_shard(self.store, bucket, spec, ticket.chunk, shard, time.monotonic() - started),
        )
        return len(result.outputs)
    staging = shard_key(spec.job_id, ticket.chunk, staging=True)
    self.store.put(
        bucket, staging, write_tar(shard, staging=True), content_type="application/x-tar", metadata={}
    )
    self.hand_off(INFERENCE_SHARD, [spec.to_message(), ticket.to_message(), staging])
    return len(result.outputs)
