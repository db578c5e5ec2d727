"""A real Prometheus server (Debian's `prometheus`) scrapes a dispatcher's /metrics during a job;
PromQL for the job's done items returns the ledger's count."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WITH_IMAGES
from tests.stack import Stack, free_port, wait_until

pytestmark = pytest.mark.usefixtures("workers")


def promql(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def scraped(port: int, query: str) -> float | None:
    try:
        result = promql(port, query)
    except OSError:
        return None  # Prometheus still starting
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_dispatcher_and_promql_returns_the_ledgers_counts(
    ingested: dict[str, str], tmp_path: Path
) -> None:
    stack = Stack(ingested, tmp_path / "stack")
    metrics_port, prometheus_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 500ms}\n"
        "scrape_configs:\n"
        "  - job_name: quarry-dispatcher\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    try:
        # a second dispatcher beside the session's (they take turns): this one serves /metrics
        stack.start_dispatcher(
            "dispatcher-metrics",
            env={"DISPATCH_METRICS_PORT": str(metrics_port), "METRICS_MIN_INTERVAL_S": "0.5"},
        )
        stack.start(
            "prometheus",
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
        )
        wait_until(
            lambda: scraped(prometheus_port, 'up{job="quarry-dispatcher"}') == 1, 60, "the first scrape"
        )
        job_id = stack.submit(
            WITH_IMAGES, "--augment", "hflip | rotate(limit=10)", "--variants", "3", "--chunk-size", "20"
        )
        wait_until(lambda: stack.progress(job_id).ended, 300, "the job")
        ledger = stack.progress(job_id)
        assert ledger.state == "finished" and ledger.done > 0

        def done_in_prometheus() -> float | None:
            return scraped(prometheus_port, f'quarry_job_items{{job_id="{job_id}",status="done"}}')

        wait_until(lambda: done_in_prometheus() == ledger.done, 30, "Prometheus to hold the final count")
        total = scraped(prometheus_port, f'quarry_job_items{{job_id="{job_id}",status="total"}}')
        assert total == ledger.total
        assert scraped(prometheus_port, f'quarry_job_running{{job_id="{job_id}"}}') == 0
        # it was scraped while it ran, too (885 items take seconds; a scrape every 0.5 s)
        ran = scraped(prometheus_port, f'max_over_time(quarry_job_running{{job_id="{job_id}"}}[5m])')
        assert ran == 1
    finally:
        stack.stop_all()
