"""The Prometheus side of the dispatcher's metrics: the alert rules pass promtool's check and its
unit cases (the stalled-job rule fires), the scrape config is valid, the dashboard asks only for
metrics the dispatcher serves, and Compose and Kubernetes point Prometheus at the dispatcher."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import psutil
import psycopg
from prometheus_client import CollectorRegistry, generate_latest

from common.config import Settings
from common.jobs import JobProgress
from producer.metrics import DispatcherMetrics, chunk_metrics, job_metrics
from tests.deploy.render import ROOT, compose_config, find, kustomize
from tests.stack import free_port

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "quarry-dashboard.json"
PROMQL_FUNCTIONS = {"sum", "max", "count", "rate", "by", "on", "histogram_quantile", "le", "ignoring"}


def promtool(*args: str, folder: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=folder, capture_output=True, text=True, timeout=60)


def test_the_alert_rules_pass_promtool_and_the_stalled_job_rule_fires_in_its_case() -> None:
    checked = promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 3 rules found" in checked.stdout
    tested = promtool("test", "rules", "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = (PROMETHEUS / "rules_test.yml").read_text()
    assert "alertname: QuarryJobStalled" in cases and "job_id: stuck" in cases


def test_a_rule_case_that_expects_the_wrong_alert_fails(tmp_path: Path) -> None:
    """promtool really evaluates the cases: flip the stalled job's expectation and it fails."""
    wrong = (PROMETHEUS / "rules_test.yml").read_text().replace("job_id: stuck", "job_id: moving", 1)
    (tmp_path / "rules.yml").write_text((PROMETHEUS / "rules.yml").read_text())
    (tmp_path / "rules_test.yml").write_text(wrong)
    assert promtool("test", "rules", "rules_test.yml", folder=tmp_path).returncode != 0


def test_the_scrape_config_is_valid_and_scrapes_the_dispatcher_port() -> None:
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    default_port = Settings.model_fields["dispatch_metrics_port"].default  # tests set 0 in the env
    assert f"dispatcher:{default_port}" in (PROMETHEUS / "prometheus.yml").read_text()


def served_metric_names() -> set[str]:
    """Every sample name the dispatcher's /metrics page can hold."""
    metrics = DispatcherMetrics(Settings(), lambda queue: 0)
    registry = CollectorRegistry()
    for collector in (metrics.sent, metrics.expired, metrics.exhausted, metrics.tick_seconds):
        registry.register(collector)
    page = generate_latest(registry).decode()
    job = JobProgress("j", "running", 10, 4, 1, 2.0, 1, 1, "")
    families = [*job_metrics([job]), *chunk_metrics([("j", "pending", 1, 0)])]
    names = {sample.name for family in families for sample in family.samples}
    names |= {line.split("{")[0].split(" ")[0] for line in page.splitlines() if not line.startswith("#")}
    return names | {"quarry_queue_messages", "quarry_dispatchers_live", "up"}


def test_the_dashboard_asks_only_for_metrics_the_dispatcher_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert expressions
    served = served_metric_names()
    for expression in [*expressions, (PROMETHEUS / "rules.yml").read_text()]:
        asked = set(re.findall(r"\b(quarry_[a-z_]+|up)\b", expression))
        assert asked <= served, f"{asked - served} are not served by the dispatcher"


def test_compose_and_kubernetes_point_prometheus_at_the_dispatcher() -> None:
    services = compose_config("docker-compose.yml")["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert any("deploy/prometheus" in str(volume) for volume in services["prometheus"]["volumes"])
    assert "9808" in [str(port) for port in services["dispatcher"]["expose"]]
    [dispatcher] = find(kustomize("overlays/example"), "Deployment", "dispatcher")
    annotations = dispatcher["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9808"


def test_a_scrape_with_the_ledger_and_broker_away_still_answers() -> None:
    """Nothing listens on port 1: the ledger's gauges and the queue lengths are left out of the
    page, which is still served (so `up` stays about the dispatcher process)."""

    def broker_away(queue: str) -> int:
        raise ConnectionError(f"no broker for {queue}")

    away = Settings(database_url="postgresql://postgres@127.0.0.1:1/quarry", dispatch_metrics_port=0)
    metrics = DispatcherMetrics(away, broker_away)
    metrics.count(sent=3, expired=1, exhausted=0, seconds=0.01)
    page = generate_latest(metrics.registry).decode()
    assert "quarry_dispatch_sent_chunks_total 3.0" in page
    assert "quarry_job_items" not in page and "quarry_queue_messages" not in page


def test_the_ledger_is_read_at_most_once_per_interval_on_one_connection(
    settings: Settings, db: psycopg.Connection
) -> None:
    """Scrapes faster than METRICS_MIN_INTERVAL_S are served the gauges of the last read; every
    read, however many, goes over the one connection the collector keeps (the dispatcher's login)."""

    def sessions() -> int:
        """Sessions of the dispatcher's login opened by this process (a dispatcher that another
        module started on this database has sessions of that login too)."""
        own_ports = {c.laddr.port for c in psutil.Process().net_connections("tcp")}
        rows = db.execute(
            "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() AND usename = %s",
            (settings.dispatcher_role,),
        ).fetchall()
        return sum(1 for (port,) in rows if port in own_ports)

    before = sessions()
    slow = DispatcherMetrics(settings.model_copy(update={"metrics_min_interval_s": 3600}), lambda queue: 0)
    pages = [generate_latest(slow.registry).decode() for _ in range(5)]
    assert slow.ledger.reads == 1 and len(set(pages)) == 1 and "quarry_dispatchers_live" in pages[0]
    eager = DispatcherMetrics(settings.model_copy(update={"metrics_min_interval_s": 0}), lambda queue: 0)
    for _ in range(4):
        generate_latest(eager.registry)
    assert eager.ledger.reads == 4
    assert sessions() - before == 2  # one connection each, kept
    for collector in (slow.ledger, eager.ledger):
        collector.connection().close()


def test_metrics_listen_on_loopback_unless_told_otherwise() -> None:
    port = free_port()
    metrics = DispatcherMetrics(Settings(dispatch_metrics_port=port), lambda queue: 0)
    assert Settings.model_fields["dispatch_metrics_bind"].default == "127.0.0.1"
    metrics.serve()
    try:
        listening = [
            c.laddr
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
    finally:
        metrics.close()
    assert [address.ip for address in listening] == ["127.0.0.1"]
