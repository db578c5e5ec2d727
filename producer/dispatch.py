"""`producer dispatch`: the service that meters chunks from the ledger into the transform queue.

Each tick, under a row lock of quarry_locks (so replicas take turns and never double-dispatch):
fail recording jobs whose producer is gone, end the leases of chunks whose worker process or
message was lost (common/liveness.py), return chunks whose lease ran out to pending, fail
those out of attempts, then claim pending
chunks up to the in-flight budget, shared fairly across running jobs. The claim is committed
before the messages are published; chunks the broker refuses go back to pending at once, and a
dispatcher that dies in between leaves chunks whose lease simply runs out.
"""

from __future__ import annotations

import heapq
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from celery import Celery

from common.config import Settings
from common.db import Database, first_line, take_lock
from common.errors import BrokerUnavailable, ConfigError, TransientError
from common.jobspec import INGEST_KIND
from common.ledger import Ticket, claim_chunks, fail_exhausted, return_expired, unclaim
from common.liveness import heal_lost_holds, heal_lost_messages
from common.recording import fail_orphaned_recordings
from producer.metrics import DispatcherMetrics
from producer.wake import Wakeup
from producer.watchdog import Watchdog
from workers.base import BROKER_ERRORS, PUBLISH_RETRY, queue_length
from workers.routes import INGEST, TASK_ROUTES, TRANSFORM

log = logging.getLogger(__name__)
DISPATCH_LOCK = "dispatch"  # a row of quarry_locks: one dispatcher tick at a time, over all replicas


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    spec: dict[str, object]
    in_flight: int
    pending: int  # capped at the budget + 1


@dataclass
class TickReport:
    sent: int = 0
    returned: int = 0  # leases that ran out, back to pending
    failed_chunks: int = 0  # out of attempts
    waiting: int = 0  # pending chunks the budget had no room for (at most the budget per job)
    orphaned: int = 0  # recording jobs whose producer went away, failed
    lost: int = 0  # chunks of lost worker processes or lost messages, their leases ended now


def allocate(free: int, jobs: list[RunningJob]) -> dict[str, int]:
    """Share `free` dispatch slots so that in-flight counts even out across jobs (water-filling:
    each slot goes to the job with the fewest chunks in flight that still has pending ones)."""
    heap = [(job.in_flight, job.job_id, job.pending) for job in jobs if job.pending > 0]
    heapq.heapify(heap)
    shares: dict[str, int] = {}
    while free > 0 and heap:
        in_flight, job_id, pending = heapq.heappop(heap)
        shares[job_id] = shares.get(job_id, 0) + 1
        free -= 1
        if pending > 1:
            heapq.heappush(heap, (in_flight + 1, job_id, pending - 1))
    return shares


def running_jobs(conn: psycopg.Connection, cap: int) -> list[RunningJob]:
    rows = conn.execute(
        """
        SELECT j.id, j.spec,
            (SELECT count(*) FROM job_chunks c WHERE c.job_id = j.id AND c.state = 'dispatched'),
            (SELECT count(*) FROM (SELECT FROM job_chunks c WHERE c.job_id = j.id AND c.state = 'pending'
                                   LIMIT %s) p)
        FROM jobs j WHERE j.state = 'running' ORDER BY j.created_at
        """,
        (cap,),
    ).fetchall()
    return [RunningJob(str(row[0]), row[1], row[2], row[3]) for row in rows]


def claim(
    conn: psycopg.Connection, settings: Settings, queued: int | None = None
) -> tuple[TickReport, list[tuple[dict[str, object], Ticket]]]:
    """One round of healing, lease expiry and claiming, in one transaction under the dispatch
    lock. `queued`, when given, is the messages in every stage's queue, read just before: when
    there are none, a chunk no one holds has lost its message (common/liveness.py)."""
    report = TickReport()
    claimed: list[tuple[dict[str, object], Ticket]] = []
    with conn.transaction():
        if not take_lock(conn, DISPATCH_LOCK, wait=False):  # another dispatcher is mid-tick
            return report, claimed
        report.orphaned = fail_orphaned_recordings(conn)
        report.lost = heal_lost_holds(conn, settings.holder_timeout_s)
        if queued == 0:
            report.lost += heal_lost_messages(conn, settings.queue_quiet_s, settings.chunk_lease_s)
        report.returned = return_expired(conn, settings.chunk_max_attempts)
        report.failed_chunks = fail_exhausted(conn, settings.chunk_max_attempts, settings.chunk_lease_s)
        budget = settings.dispatch_budget_chunks
        jobs = running_jobs(conn, budget + 1)  # one over the budget: tells whether more wait
        free = budget - sum(job.in_flight for job in jobs)
        specs = {job.job_id: job.spec for job in jobs}
        for job_id, count in allocate(free, jobs).items():
            for chunk, dispatch in claim_chunks(conn, job_id, count, settings.chunk_lease_s):
                claimed.append((specs[job_id], Ticket(job_id, chunk, dispatch)))
        report.waiting = sum(job.pending for job in jobs) - len(claimed)
    return report, claimed


def tick(
    database: Database,
    publish: Callable[[dict[str, object], Ticket], None],
    settings: Settings,
    queued: int | None = None,
) -> TickReport:
    """Claim chunks (committed first, so a worker never sees a message before its chunk is
    dispatched), then publish them; what the broker refuses is handed back to pending."""
    report, claimed = database.run(claim, settings, queued)
    for position, (spec, ticket) in enumerate(claimed):
        try:
            publish(spec, ticket)
        except BaseException:
            database.run(unclaim, [t for _, t in claimed[position:]])
            raise
        report.sent += 1
    return report


def heartbeat(conn: psycopg.Connection, name: str) -> None:
    conn.execute(
        "INSERT INTO dispatchers (name, seen_at) VALUES (%s, now())"
        " ON CONFLICT (name) DO UPDATE SET seen_at = EXCLUDED.seen_at",
        (name,),
    )


def dispatcher_name() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


QUEUES = tuple(sorted({route["queue"] for route in TASK_ROUTES.values()}))
BROKER_CHECK_S = 1.0  # how often the dispatcher reads the broker's queues for lost messages


def queued_messages(app: Celery) -> int:
    """Messages waiting in every stage's queue."""
    return sum(queue_length(app, queue) for queue in QUEUES)


MIN_REDIS = (6, 2)  # the oldest Redis tested (the embedded one); 7 is the machine's


def check_broker(app: Celery) -> None:
    """BrokerUnavailable (one line) when the broker does not answer at start-up; ConfigError
    when it is a Redis older than MIN_REDIS."""
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=2, interval_start=0.5, timeout=5)
            version = str(connection.default_channel.client.info("server")["redis_version"])
        except BROKER_ERRORS as exc:
            where = connection.as_uri()  # the password masked
            raise BrokerUnavailable(f"cannot reach the broker at {where}: {first_line(exc)}") from exc
    if refusal := redis_too_old(version):
        raise ConfigError(refusal)


def redis_too_old(version: str) -> str | None:
    """Why a Redis of `version` ('7.4.2') is refused; None when it is not."""
    if tuple(int(part) for part in version.split(".")[:2]) >= MIN_REDIS:
        return None
    needed = ".".join(map(str, MIN_REDIS))
    return f"Redis {needed} or newer is needed; the broker at CELERY_BROKER_URL is {version}"


def run_dispatcher(app: Celery, settings: Settings, *, max_ticks: int | None = None) -> None:
    """Tick forever (or `max_ticks` times); an outage of PostgreSQL or the broker is logged and
    waited out, never fatal. A loop that stops turning for DISPATCH_STALL_S (a silent peer)
    ends the process, for its supervisor to restart."""
    # a dispatcher cut off inside its claim transaction holds the dispatch lock until the server
    # ends that transaction: give up on it as soon as the watchdog gives up on the dispatcher
    database = Database(settings.dispatcher_database_url, idle_in_transaction_s=settings.dispatch_stall_s)
    name = dispatcher_name()

    def publish(spec: dict[str, object], ticket: Ticket) -> None:
        task = INGEST if spec.get("kind") == INGEST_KIND else TRANSFORM  # an ingest's units, or images
        app.send_task(task, args=[spec, ticket.to_message()], retry=True, retry_policy=PUBLISH_RETRY)

    log.info(
        "dispatcher %s: budget %d chunks, lease %d s, %d attempts",
        name,
        settings.dispatch_budget_chunks,
        settings.chunk_lease_s,
        settings.chunk_max_attempts,
    )
    watchdog = Watchdog(settings.dispatch_stall_s, f"dispatcher {name}").start()
    wakeup = Wakeup(settings.dispatcher_database_url)
    metrics = DispatcherMetrics(settings, lambda queue: queue_length(app, queue))
    metrics.serve()
    ticks, beaten, checked = 0, 0.0, 0.0
    while max_ticks is None or ticks < max_ticks:
        ticks += 1
        report = TickReport()
        try:
            started = time.monotonic()
            if started - beaten >= settings.dispatch_interval_s:  # busy ticks come faster
                database.run(heartbeat, name)
                beaten = started
            queued = None
            if started - checked >= BROKER_CHECK_S:
                queued, checked = queued_messages(app), started
            report = tick(database, publish, settings, queued)
            metrics.count(report.sent, report.returned, report.failed_chunks, time.monotonic() - started)
            if report.orphaned:
                log.warning("%d recording jobs failed: their producer went away", report.orphaned)
            if report.lost:
                log.warning("%d chunks of lost workers or lost messages sent again", report.lost)
            if report.returned or report.failed_chunks:
                log.info(
                    "sent %d chunks; %d leases ran out; %d chunks out of attempts",
                    report.sent,
                    report.returned,
                    report.failed_chunks,
                )
            elif report.sent:
                log.debug("sent %d chunks; %d wait for room", report.sent, report.waiting)
        except (*BROKER_ERRORS, TransientError) as exc:  # the tick rolled back: try again next tick
            log.warning("dispatch paused: %s", first_line(exc))
            time.sleep(min(5.0, settings.dispatch_interval_s * 4))
        watchdog.beat()
        # chunks waiting for room: look again soon, a slot frees as each chunk finishes
        if wakeup.wait(settings.dispatch_busy_interval_s if report.waiting else settings.dispatch_interval_s):
            log.info("woken by a new or retried job")
    wakeup.close()
