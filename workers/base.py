"""The task base class: per-process clients, declared retries, failures recorded as data."""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from typing import Any

import psycopg
from celery import Task

from common.config import Settings, get_settings
from common.db import connect
from common.errors import TRANSIENT_ERRORS, UnknownJob
from common.jobs import ItemResult, record_items
from common.jobspec import JobSpec
from common.storage import ObjectStore

log = logging.getLogger(__name__)


class StageTask(Task):
    """A pipeline stage. Its clients are created once per worker process (a connection per
    thread for PostgreSQL, so the threads pool is safe); transient errors retry with backoff."""

    abstract = True
    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = True
    retry_backoff_max = 120
    retry_jitter = True
    max_retries = get_settings().task_max_retries
    acks_late = True
    reject_on_worker_lost = True
    _local = threading.local()

    @cached_property
    def settings(self) -> Settings:
        return get_settings()

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.settings, max_connections=32)

    @property
    def db(self) -> psycopg.Connection:
        """This thread's autocommit connection, reopened if it broke."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = connect(self.settings.database_url, autocommit=True)
            self._local.conn = conn
        return conn

    def record(self, spec: JobSpec, results: list[ItemResult]) -> None:
        record_items(self.db, spec.job_id, results)

    def items_of(self, spec: JobSpec, payload: Any) -> list[tuple[int, int]]:
        """The (image id, variant) pairs a message is about; each stage says how."""
        raise NotImplementedError

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Retries exhausted or a bug: record every item of the message as failed, so the job
        still finishes and says why."""
        spec_message, payload = args
        spec = JobSpec.from_message(spec_message)
        if isinstance(exc, UnknownJob):  # nowhere to record it: the log line is the record
            log.error("%s", exc)
            return
        error = f"{self.name.removeprefix('quarry.')}: {type(exc).__name__}: {exc}"
        failures = [
            ItemResult(image_id, variant, "failed", error=error)
            for image_id, variant in self.items_of(spec, payload)
        ]
        try:
            self.record(spec, failures)
        except Exception:  # the database itself is down: the log is all that is left
            log.exception("could not record %d failed items of job %s", len(failures), spec.job_id)
