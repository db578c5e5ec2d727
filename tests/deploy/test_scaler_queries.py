"""The KEDA postgresql scalers' queries, run against a real ledger as the scaler role KEDA logs in
as: they count what they claim to, and that role reads the backlog and nothing else."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from common.config import Settings, get_settings, login_url
from common.jobs import cancel_job
from common.jobspec import JobSpec
from producer.dispatch import claim
from quarry.submit import submit_job
from tests.deploy.render import find, kustomize


def scaler_query(pool: str, trigger_type: str = "postgresql") -> str:
    (scaled,) = find(kustomize("base"), "ScaledObject", f"worker-{pool}")
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == trigger_type]
    return trigger["metadata"]["query"]


def scaler_url() -> str:
    settings = get_settings()
    return login_url(settings.database_url, settings.scaler_role, settings.scaler_role_password)


def metric(db: psycopg.Connection, pool: str) -> int:
    with psycopg.connect(scaler_url()) as scaler:
        (value,) = scaler.execute(scaler_query(pool)).fetchone()  # type: ignore[misc]
    return int(value)


def test_the_scaler_role_reads_the_backlog_and_nothing_else(db: psycopg.Connection) -> None:
    with psycopg.connect(scaler_url(), autocommit=True) as scaler:
        assert scaler.execute("SELECT count(*) FROM job_chunks").fetchone() is not None
        for statement in (
            "SELECT count(*) FROM job_items",
            "SELECT count(*) FROM styles",
            "UPDATE jobs SET state = 'cancelled'",
            "DELETE FROM job_chunks",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                scaler.execute(statement)


def record(db: psycopg.Connection, chunks: int, model: str | None = None, output: str = "files") -> str:
    spec = JobSpec(job_id=str(uuid.uuid4()), variants=1, model=model, output=output)  # type: ignore[arg-type]
    submit_job(db, get_settings(), f"SELECT generate_series(1, {chunks}) AS id", spec, 1)
    return spec.job_id


def test_scaler_queries_follow_the_ledger(db: psycopg.Connection, settings: Settings) -> None:
    assert [metric(db, pool) for pool in ("transform", "upload", "inference")] == [0, 0, 0]
    plain = record(db, chunks=5)
    classified = record(db, chunks=3, model="fashion-classifier")
    assert metric(db, "transform") == 8  # pending chunks are backlog
    assert metric(db, "upload") == 0 and metric(db, "inference") == 0  # nothing in flight yet

    claim(db, settings.model_copy(update={"dispatch_budget_chunks": 4}))  # 2 chunks of each job
    assert metric(db, "transform") == 8  # dispatched chunks are still backlog
    assert metric(db, "upload") == 4
    assert metric(db, "inference") == 2  # only chunks of the job with a model

    cancel_job(db, plain)
    assert (metric(db, "transform"), metric(db, "upload"), metric(db, "inference")) == (3, 2, 2)
    cancel_job(db, classified)
    assert [metric(db, pool) for pool in ("transform", "upload", "inference")] == [0, 0, 0]


def test_webdataset_jobs_keep_no_upload_replica(db: psycopg.Connection, settings: Settings) -> None:
    record(db, chunks=3, output="webdataset")
    claim(db, settings)
    assert (metric(db, "transform"), metric(db, "upload"), metric(db, "inference")) == (3, 0, 0)


def test_the_backlog_query_is_capped_so_a_huge_job_polls_cheaply(db: psycopg.Connection) -> None:
    record(db, chunks=500)
    assert metric(db, "transform") == 200  # LIMIT 200: 50 replicas x 4 chunks
