"""The dispatcher's Prometheus metrics, served on DISPATCH_METRICS_PORT (docs/operations.md).

Two kinds. The ledger's counts (items and chunks of each running or recently ended job, live
dispatchers, queue lengths) are read from PostgreSQL and the broker when Prometheus scrapes, so
every dispatcher reports the same truth and a restarted one loses nothing; they are read on one
connection kept open, at most once per METRICS_MIN_INTERVAL_S (scrapes in between get the same
gauges), so whoever reaches the port cannot make it load the database. This dispatcher's own
loop (chunks sent, leases expired, chunks out of attempts, tick duration) is counted as it turns.
The page is served on DISPATCH_METRICS_BIND (loopback unless a deployment says otherwise).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from wsgiref.simple_server import WSGIServer

import psycopg
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.config import Settings
from common.db import connect, first_line
from common.jobs import JobProgress, current_jobs

log = logging.getLogger(__name__)

QUEUES = ("transform", "upload", "inference")
CHUNK_STATES = ("pending", "dispatched", "finished")
SCRAPE_STATEMENT_TIMEOUT_MS = 5000

CHUNKS = """
SELECT c.job_id::text, c.state, count(*), coalesce(sum(greatest(c.dispatches - 1, 0)), 0)
FROM job_chunks c JOIN jobs j ON j.id = c.job_id
WHERE j.state = 'running' OR j.finished_at > clock_timestamp() - make_interval(secs => %s)
GROUP BY 1, 2
"""
LIVE_DISPATCHERS = """
SELECT count(*) FROM dispatchers WHERE seen_at > clock_timestamp() - make_interval(secs => %s)
"""


def gauge(name: str, documentation: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


class LedgerCollector(Collector):
    """Gauges read from the ledger and the broker at each scrape; a source that does not answer
    leaves its gauges out of that scrape (logged), never the whole page."""

    def __init__(self, settings: Settings, queue_length: Callable[[str], int]) -> None:
        self.settings = settings
        self.queue_length = queue_length
        self.reads = 0  # times the ledger was read (the gauges are served from the last read between)
        self._lock = threading.Lock()  # scrapes are served from threads: one read at a time
        self._conn: psycopg.Connection | None = None
        self._read_at = -float("inf")
        self._ledger: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self.ledger_metrics()
        except Exception as exc:  # a scrape must not fail because PostgreSQL is away
            log.warning("metrics: the ledger did not answer: %s", first_line(exc))
        try:
            yield self.queue_metric()
        except Exception as exc:
            log.warning("metrics: the broker did not answer: %s", first_line(exc))

    def ledger_metrics(self) -> list[Metric]:
        """The ledger's gauges: read anew when the last read is METRICS_MIN_INTERVAL_S old."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.settings.metrics_min_interval_s:
                self._ledger = self.read_ledger()
                self._read_at = time.monotonic()
            return self._ledger

    def read_ledger(self) -> list[Metric]:
        recent = self.settings.metrics_recent_s
        conn = self.connection()
        try:
            jobs = current_jobs(conn, recent)
            chunks = conn.execute(CHUNKS, (recent,)).fetchall()
            row = conn.execute(LIVE_DISPATCHERS, (3 * self.settings.dispatch_interval_s + 10,)).fetchone()
        except psycopg.Error:
            conn.close()  # opened again at the next read
            raise
        self.reads += 1
        live = gauge("quarry_dispatchers_live", "Dispatchers that ticked in the last 3 intervals + 10 s")
        live.add_metric([], int(row[0]) if row else 0)
        return [*job_metrics(jobs), *chunk_metrics(chunks), live]

    def connection(self) -> psycopg.Connection:
        """The one connection the gauges are read on, opened again when it broke."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.settings.dispatcher_database_url, autocommit=True)
            self._conn.execute(f"SET statement_timeout = {SCRAPE_STATEMENT_TIMEOUT_MS}")
        return self._conn

    def queue_metric(self) -> Metric:
        queues = gauge("quarry_queue_messages", "Messages waiting in a pool's queue", "queue")
        for queue in QUEUES:
            queues.add_metric([queue], self.queue_length(queue))
        return queues


def job_metrics(jobs: Sequence[JobProgress]) -> Iterator[Metric]:
    """Per job: items by status, running (1/0), recording (1/0), seconds since it started, mean
    items per second."""
    items = gauge("quarry_job_items", "Items of a running or recently ended job", "job_id", "status")
    running = gauge("quarry_job_running", "1 while the job runs (recording too), 0 once it ended", "job_id")
    recording = gauge(
        "quarry_job_recording", "1 while the job's selection is still being recorded (total grows)", "job_id"
    )
    seconds = gauge("quarry_job_seconds", "Seconds from the job's start to now or to its end", "job_id")
    rate = gauge("quarry_job_items_per_second", "Items done per second, mean over the job so far", "job_id")
    for job in jobs:
        items.add_metric([job.job_id, "total"], job.total)
        items.add_metric([job.job_id, "done"], job.done)
        items.add_metric([job.job_id, "failed"], job.failed)
        running.add_metric([job.job_id], 0 if job.ended else 1)
        recording.add_metric([job.job_id], 1 if job.state == "recording" else 0)
        seconds.add_metric([job.job_id], job.seconds)
        rate.add_metric([job.job_id], job.done / job.seconds if job.seconds > 0 else 0.0)
    yield from (items, running, recording, seconds, rate)


def chunk_metrics(rows: Sequence[tuple[str, str, int, int]]) -> Iterator[Metric]:
    """Per job: chunks by state (0 for a state with none), and re-dispatches so far."""
    chunks = gauge("quarry_job_chunks", "Chunks of a job by ledger state", "job_id", "state")
    redispatches = gauge("quarry_job_redispatches", "Dispatches beyond each chunk's first", "job_id")
    counts: dict[str, dict[str, int]] = {}
    sent_again: dict[str, int] = {}
    for job_id, state, count, again in rows:
        counts.setdefault(job_id, dict.fromkeys(CHUNK_STATES, 0))[state] = int(count)
        sent_again[job_id] = sent_again.get(job_id, 0) + int(again)
    for job_id, by_state in counts.items():
        for state, count in by_state.items():
            chunks.add_metric([job_id, state], count)
        redispatches.add_metric([job_id], sent_again[job_id])
    yield from (chunks, redispatches)


class DispatcherMetrics:
    """This dispatcher's loop, and the HTTP server that serves it with the ledger's gauges."""

    def __init__(self, settings: Settings, queue_length: Callable[[str], int]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.sent = Counter("quarry_dispatch_sent_chunks", "Chunks sent", registry=registry)
        self.expired = Counter("quarry_dispatch_expired_leases", "Leases run out", registry=registry)
        self.exhausted = Counter("quarry_dispatch_exhausted_chunks", "Out of attempts", registry=registry)
        self.tick_seconds = Histogram(
            "quarry_dispatch_tick_seconds",
            "Duration of one dispatch tick (claim, publish, expire)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.ledger = LedgerCollector(settings, queue_length)
        self.registry.register(self.ledger)
        self.port = settings.dispatch_metrics_port
        self.bind = settings.dispatch_metrics_bind
        self.server: WSGIServer | None = None

    def serve(self) -> None:
        """Listen on DISPATCH_METRICS_BIND:DISPATCH_METRICS_PORT; a port in use is logged, and
        dispatching goes on without metrics."""
        if not self.port:
            return
        try:
            self.server, _ = start_http_server(self.port, addr=self.bind, registry=self.registry)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d: %s", self.bind, self.port, exc)
            return
        log.info("metrics on %s:%d/metrics", self.bind, self.port)

    def close(self) -> None:
        """Stop serving (the dispatcher's process ends with it anyway)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def count(self, sent: int, expired: int, exhausted: int, seconds: float) -> None:
        self.sent.inc(sent)
        self.expired.inc(expired)
        self.exhausted.inc(exhausted)
        self.tick_seconds.observe(seconds)
