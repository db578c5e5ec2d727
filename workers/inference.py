"""The inference pool: one onnxruntime session per process, one batch per message."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import lru_cache, partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from celery.signals import celeryd_after_setup

from common.config import get_settings
from common.embeddings import record_embeddings
from common.errors import ModelError, QuarryError
from common.inference import Inferred, ItemRef, as_stored, classify_shard, infer_items, model_decoder
from common.jobspec import JobSpec
from common.ledger import Ticket
from common.model import Classifier, locate_model, require_cuda
from common.outputs import OutputCache, cached_outputs, no_cache, store_outputs
from common.paths import MODELS_DIR
from common.shards import read_tar, shard_key, store_shard
from common.sources import Source
from common.storage import ObjectStore
from workers.base import StageTask
from workers.celery_app import app
from workers.routes import INFERENCE, INFERENCE_SHARD, queue_of

log = logging.getLogger(__name__)


class InferenceTask(StageTask):
    def fetch_many(self, locators: list[str], job_id: str) -> dict[str, bytes | QuarryError]:
        """Images by locator (an object, or a shard member's range), fetched concurrently: the
        job's own outputs, or sources SOURCE_BUCKETS allows; nothing else a message names."""
        sources = {locator: Source.from_locator(locator) for locator in dict.fromkeys(locators)}
        own = f"s3://{self.settings.output_bucket}/{job_id}/"
        read = self.store.read_many(list(sources.values()), own)
        fetched: dict[str, bytes | QuarryError] = {}
        for locator, source in sources.items():
            got = read[source]
            fetched[locator] = got if isinstance(got, QuarryError) else got[0]
        return fetched

    @lru_cache(maxsize=2)  # noqa: B019 - one task instance per process; models are few
    def classifier(self, reference: str, digest: str | None) -> Classifier:
        """The model the job started with, loaded once per process and kept; ModelError when the
        file now holds other bytes (its outputs would be recorded under the wrong model)."""
        path = locate_model(reference, MODELS_DIR, Path(self.settings.model_cache_dir), lambda: self.store)
        classifier = require_cuda(path) if self.settings.require_gpu else Classifier(path)
        if digest is not None and classifier.digest != digest:
            raise ModelError(f"the model {reference} changed since the job started: run the job again")
        return classifier

    def output_cache(self, spec: JobSpec, classifier: Classifier) -> OutputCache:
        """The catalog's outputs of this model (none for a job from before schema 7)."""
        if spec.model_digest is None:
            return OutputCache(no_cache, spec.top_k, len(classifier.info.labels))
        model = bytes.fromhex(spec.model_digest)
        return OutputCache(
            lambda images: self.ledger(cached_outputs, model, images), spec.top_k, len(classifier.info.labels)
        )

    def keep(self, spec: JobSpec, cache: OutputCache, run: Inferred) -> None:
        """Store what the model computed, and the embeddings of the images it read as stored."""
        if spec.model_digest is not None:
            self.ledger(store_outputs, bytes.fromhex(spec.model_digest), cache.new)
        if spec.embedding_set is not None:
            self.ledger(record_embeddings, spec.embedding_set, run.embeddings)


@app.task(base=InferenceTask, bind=True, name=INFERENCE)
def infer_batch(
    self: InferenceTask,
    spec_message: dict[str, Any],
    ticket_message: dict[str, Any],
    refs: list[dict[str, Any]],
) -> int:
    """Classify one batch and store the predictions; returns how many were classified."""
    spec = JobSpec.from_message(spec_message)
    ticket = Ticket.from_message(ticket_message)
    assert spec.model, "inference tasks are only sent for jobs with a model"
    if not self.is_live(ticket):
        return 0
    classifier = self.classifier(spec.model, spec.model_digest)
    cache = self.output_cache(spec, classifier)
    run = infer_items(
        classifier,
        [ItemRef.from_message(ref) for ref in refs],
        partial(self.fetch_many, job_id=spec.job_id),
        spec.top_k,
        model_decoder(classifier, spec.exact_decode, self.settings.image_max_pixels),
        cache,
        as_stored(spec),
    )
    self.keep(spec, cache, run)
    self.record(spec, ticket, run.results)
    return sum(result.status == "done" for result in run.results)


@app.task(base=InferenceTask, bind=True, name=INFERENCE_SHARD)
def infer_shard(
    self: InferenceTask, spec_message: dict[str, Any], ticket_message: dict[str, Any], staging_key: str
) -> int:
    """Read a staged shard once, classify it, write the final shard and its manifest, record
    every item, and delete the staging copy; returns how many items it recorded. The staging
    key is derived here from the job and chunk: a message naming another is not followed."""
    spec = JobSpec.from_message(spec_message)
    ticket = Ticket.from_message(ticket_message)
    assert spec.model, "shards are staged only for jobs with a model"
    if staging_key != (derived := shard_key(spec.job_id, ticket.chunk, staging=True)):
        log.warning(
            "job %s chunk %d: a message named staging key %r: %r is used",
            spec.job_id,
            ticket.chunk,
            staging_key,
            derived,
        )
        staging_key = derived
    if not self.is_live(ticket):
        return 0
    started = time.monotonic()
    bucket = self.settings.output_bucket
    classifier = self.classifier(spec.model, spec.model_digest)
    cache = self.output_cache(spec, classifier)
    shard, run = classify_shard(
        classifier,
        read_tar(self.store.get(bucket, staging_key)),
        spec.infer_on,
        spec.top_k,
        model_decoder(classifier, spec.exact_decode, self.settings.image_max_pixels),
        cache,
        as_stored(spec),
    )
    results = store_shard(self.store, bucket, spec, ticket.chunk, shard, time.monotonic() - started)
    ran = {result.slot for result in run.results}
    results = [replace(result, inferred=result.slot in ran) for result in results]
    self.keep(spec, cache, run)
    self.record(spec, ticket, results)
    self.store.delete(bucket, staging_key)
    return len(results)


def cuda_problem(model: str) -> str | None:
    """Why `model` would not run on CUDA here, or None when it does (run in a fresh process)."""
    settings = get_settings()
    try:
        store = ObjectStore(settings)
        path = locate_model(model, MODELS_DIR, Path(settings.model_cache_dir), lambda: store)
        require_cuda(path)
    except QuarryError as exc:
        return str(exc)
    return None


@celeryd_after_setup.connect
def refuse_to_start_without_gpu(sender: str, instance: Any, **_: Any) -> None:
    """REQUIRE_GPU=1: an inference worker whose model would run on CPU exits before taking a task.

    The probe runs in a spawned process so that this parent never initialises CUDA before it
    forks the pool (a forked child cannot use its parent's CUDA context).
    """
    settings = get_settings()
    if not settings.require_gpu or queue_of(INFERENCE) not in instance.app.amqp.queues.consume_from:
        return
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as probe:
        problem = probe.submit(cuda_problem, settings.default_model).result()
    if problem:
        log.critical("refusing to start %s: %s", sender, problem)
        raise SystemExit(f"refusing to start {sender}: {problem}")
    log.info("REQUIRE_GPU: %s runs on CUDAExecutionProvider", settings.default_model)
