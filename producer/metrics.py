"""The dispatcher's Prometheus metrics, served on DISPATCH_METRICS_PORT (docs/operations.md).

Two kinds. The ledger's counts (items and chunks of each running or recently ended job, live
dispatchers, queue lengths) are read from PostgreSQL and the broker when Prometheus scrapes, so
every dispatcher reports the same truth and a restarted one loses nothing. This dispatcher's own
loop (chunks sent, leases expired, chunks out of attempts, tick duration) is counted as it turns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

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

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self.ledger_metrics()
        except Exception as exc:  # a scrape must not fail because PostgreSQL is away
            log.warning("metrics: the ledger did not answer: %s", first_line(exc))
        try:
            yield self.queue_metric()
        except Exception as exc:
            log.warning("metrics: the broker did not answer: %s", first_line(exc))

    def ledger_metrics(self) -> Iterator[Metric]:
        recent = self.settings.metrics_recent_s
        with connect(self.settings.dispatcher_database_url, autocommit=True) as conn:
            conn.execute(f"SET statement_timeout = {SCRAPE_STATEMENT_TIMEOUT_MS}")
            jobs = current_jobs(conn, recent)
            chunks = conn.execute(CHUNKS, (recent,)).fetchall()
            row = conn.execute(LIVE_DISPATCHERS, (3 * self.settings.dispatch_interval_s + 10,)).fetchone()
        yield from job_metrics(jobs)
        yield from chunk_metrics(chunks)
        live = gauge("quarry_dispatchers_live", "Dispatchers that ticked in the last 3 intervals + 10 s")
        live.add_metric([], int(row[0]) if row else 0)
        yield live

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
        self.registry.register(LedgerCollector(settings, queue_length))
        self.port = settings.dispatch_metrics_port

    def serve(self) -> None:
        """Listen on DISPATCH_METRICS_PORT (all interfaces: Prometheus scrapes from elsewhere);
        a port in use is logged, and dispatching goes on without metrics."""
        if not self.port:
            return
        try:
            start_http_server(self.port, registry=self.registry)
        except OSError as exc:
            log.error("metrics: cannot listen on DISPATCH_METRICS_PORT %d: %s", self.port, exc)
            return
        log.info("metrics on :%d/metrics", self.port)

    def count(self, sent: int, expired: int, exhausted: int, seconds: float) -> None:
        self.sent.inc(sent)
        self.expired.inc(expired)
        self.exhausted.inc(exhausted)
        self.tick_seconds.observe(seconds)
