"""The task base class: per-process clients, the ledger, hand-offs, declared retries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

from celery import Celery, Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from common.config import Settings, get_settings, stage_time_limits
from common.db import Database
from common.errors import TRANSIENT_ERRORS, BrokerUnavailable, TransientError, UnknownJob, UserError
from common.jobs import job_spec
from common.jobspec import JobSpec
from common.ledger import ItemResult, Ticket, hand_back, note_failure, record_progress, touch
from common.liveness import Heartbeat, hold, release
from common.storage import ObjectStore

log = logging.getLogger(__name__)
R = TypeVar("R")
BROKER_ERRORS = (KombuOperationalError, RedisError, ConnectionError, OSError)
# kombu retries a publish through a broker restart for about a minute before giving up
RECORDED_SPECS = 64  # job specs a worker process keeps (jobs in flight at once are few)
PUBLISH_RETRY = {"max_retries": 30, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 3}


class StageTask(Task):
    """A pipeline stage. Clients are created once per worker process (a PostgreSQL connection per
    thread, so the threads pool is safe); transient errors retry with backoff; everything a stage
    records goes through the chunk ledger, which drops messages of finished or cancelled chunks."""

    abstract = True
    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = True
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = get_settings().task_max_retries
    acks_late = True
    # A worker that dies mid-task loses the message on purpose: the chunk's lease runs out and the
    # dispatcher sends it again, counting the attempt, so an image that kills workers cannot loop.
    reject_on_worker_lost = False

    @cached_property
    def settings(self) -> Settings:
        return get_settings()

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.settings, max_connections=32)

    @cached_property
    def heartbeat(self) -> Heartbeat:
        return Heartbeat(self.settings.worker_database_url, self.settings.worker_heartbeat_s)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task holding its chunk (common/liveness.py): if this process is lost meanwhile,
        the dispatcher sends the chunk again within HOLDER_TIMEOUT_S, not CHUNK_LEASE_S. The spec
        the task runs with is the job's record, never the message's (anyone who reaches the
        broker could write a message): a message that says otherwise is logged and overruled."""
        ticket = Ticket.from_message(args[1])
        recorded = self.recorded_spec(ticket.job_id)
        if args[0] != recorded:
            log.warning(
                "job %s: a message's spec differs from the job's record: the record's is used", ticket.job_id
            )
        args = (recorded, *args[1:])
        task_id = str(self.request.id)
        self.ledger(hold, self.heartbeat.name, task_id, ticket)
        retrying = False
        try:
            return super().__call__(*args, **kwargs)
        except Retry:  # its retry message (the same task id) holds on, and releases when it ends
            retrying = True
            raise
        finally:
            if not retrying:
                try:
                    self.ledger(release, task_id, self.settings.chunk_lease_s)
                except Exception:  # the hold stays while this process lives; the lease still applies
                    log.exception("could not release job %s chunk %d", ticket.job_id, ticket.chunk)

    def recorded_spec(self, job_id: str) -> dict[str, Any]:
        """The spec stored with the job (a job's spec never changes: kept per process, for the
        last RECORDED_SPECS jobs); UnknownJob when the database has no such job."""
        if job_id not in self._specs:
            try:
                self._specs[job_id] = self.ledger(job_spec, job_id)
            except UserError as exc:
                raise UnknownJob(f"job {job_id} is not in this worker's database (DATABASE_URL?)") from exc
            while len(self._specs) > RECORDED_SPECS:
                self._specs.pop(next(iter(self._specs)))
        return self._specs[job_id]

    @cached_property
    def _specs(self) -> dict[str, dict[str, Any]]:
        return {}

    @cached_property
    def database(self) -> Database:
        # a stage cut off mid-transaction (a silent link) must not hold its row locks for longer
        # than the lease: the server ends such a session
        return Database(self.settings.worker_database_url, idle_in_transaction_s=self.settings.chunk_lease_s)

    def ledger(self, function: Callable[..., R], *args: Any) -> R:
        """Call a ledger function with this thread's connection, through connection loss."""
        return self.database.run(function, *args)

    def is_live(self, ticket: Ticket) -> bool:
        """Renew the chunk's lease; False (and a log line) when the message is stale."""
        live = self.ledger(touch, ticket, self.settings.chunk_lease_s)
        if not live:
            log.info("job %s chunk %d is finished or stopped: message dropped", ticket.job_id, ticket.chunk)
        return live

    def record(self, spec: JobSpec, ticket: Ticket, results: list[ItemResult]) -> None:
        self.ledger(record_progress, ticket, results, spec.item_rows, self.settings.chunk_lease_s)

    def hand_off(self, task_name: str, args: list[Any]) -> None:
        """Send the next stage's task, retrying through a broker outage; BrokerUnavailable after."""
        try:
            self.app.send_task(task_name, args=args, retry=True, retry_policy=PUBLISH_RETRY)
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"broker did not take the {task_name} message: {exc}") from exc

    def queue_length(self, queue: str) -> int:
        """Messages waiting in a queue (kombu's queue_declare reports the count)."""
        try:
            return queue_length(self.app, queue)
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"broker did not answer: {exc}") from exc

    def wait_for_room(self, queue: str, ticket: Ticket, started: float) -> bool:
        """Back-pressure: wait while `queue` holds UPLOAD_BACKLOG_MESSAGES or more, renewing the
        chunk's lease meanwhile. False when the chunk stopped being live while we waited, or when
        the task's time limit (counted from `started`, a monotonic time) draws near: the chunk is
        then handed back uncounted, to be sent again, rather than killed for overrunning."""
        limit = self.settings.upload_backlog_messages
        give_up_at = started + 0.8 * stage_time_limits(self.settings)[0]
        renewed = time.monotonic()
        if self.queue_length(queue) >= limit:
            log.info("job %s chunk %d waits for room in %s", ticket.job_id, ticket.chunk, queue)
        while self.queue_length(queue) >= limit:
            if time.monotonic() > give_up_at:
                self.ledger(hand_back, ticket)
                log.info("job %s chunk %d handed back: no room in %s", ticket.job_id, ticket.chunk, queue)
                return False
            if time.monotonic() - renewed > self.settings.chunk_lease_s / 3:
                if not self.is_live(ticket):
                    return False
                renewed = time.monotonic()
            time.sleep(0.5)
        return True

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Retries exhausted or a bug: keep the error on the chunk. A transient error waits for the
        lease to run out; any other ends the lease at once, so the chunk is tried again (and after
        CHUNK_MAX_ATTEMPTS its items fail with this error) without waiting."""
        ticket = Ticket.from_message(args[1])
        if isinstance(exc, UnknownJob):  # nowhere to record it: the log line is the record
            log.error("%s", exc)
            return
        if isinstance(exc, SoftTimeLimitExceeded):  # it may have cut a statement off mid-way
            self.database.close()
            exc = SoftTimeLimitExceeded(f"ran past the {stage_time_limits(self.settings)[0]} s time limit")
        error = f"{self.name.removeprefix('quarry.')}: {type(exc).__name__}: {exc}"
        try:
            self.ledger(note_failure, ticket, error, not isinstance(exc, TransientError))
        except Exception:  # the database itself is down: the lease will run out all the same
            log.exception("could not note the failure of job %s chunk %d", ticket.job_id, ticket.chunk)


def queue_length(app: Celery, queue: str) -> int:
    """Messages waiting in `queue` (kombu's queue_declare reports the count)."""
    with app.connection_for_write() as connection:
        return int(connection.default_channel.queue_declare(queue=queue).message_count)
