"""The KEDA postgresql scalers' queries, run against a real ledger as the scaler role KEDA logs in
as: they count what they claim to, and that role reads the backlog and nothing else. The ledger is
a database of the test's own: no dispatcher or pool of the session sees its jobs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from common.config import Settings, get_settings, login_url
from common.db import connect
from common.jobs import cancel_job
from common.jobspec import JobSpec
from producer.dispatch import claim
from quarry.submit import submit_job
from tests.conftest import PrivateDatabase
from tests.deploy.render import find, kustomize


@pytest.fixture
def settings(private_database: PrivateDatabase) -> Iterator[Settings]:
    """The session's settings on a database of Quarry's schema and roles, no dataset, no job."""
    with private_database("scaler", "schema") as env:
        yield get_settings().model_copy(update={"database_url": env["DATABASE_URL"]})


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection]:
    with connect(settings.database_url, autocommit=True) as conn:
        yield conn


def scaler_query(pool: str, trigger_type: str = "postgresql") -> str:
    (scaled,) = find(kustomize("base"), "ScaledObject", f"worker-{pool}")
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == trigger_type]
    return trigger["metadata"]["query"]


def scaler_url(settings: Settings) -> str:
    return login_url(settings.database_url, settings.scaler_role, settings.scaler_role_password)


def backlog(settings: Settings) -> tuple[int, int, int]:
    """Each pool's scaler metric: transform, upload, inference."""
    return metric(settings, "transform"), metric(settings, "upload"), metric(settings, "inference")


def metric(settings: Settings, pool: str) -> int:
    with psycopg.connect(scaler_url(settings)) as scaler:
        (value,) = scaler.execute(scaler_query(pool)).fetchone()  # type: ignore[misc]
    return int(value)


def test_the_scaler_role_reads_the_backlog_and_nothing_else(settings: Settings) -> None:
    with psycopg.connect(scaler_url(settings), autocommit=True) as scaler:
        assert scaler.execute("SELECT count(*) FROM job_chunks").fetchone() is not None
        for statement in (
            "SELECT count(*) FROM job_items",
            "SELECT count(*) FROM styles",
            "UPDATE jobs SET state = 'cancelled'",
            "DELETE FROM job_chunks",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                scaler.execute(statement)


def record(
    db: psycopg.Connection, settings: Settings, chunks: int, model: str | None = None, output: str = "files"
) -> str:
    """A job of `chunks` one-id chunks, recorded as `producer run` records it."""
    spec = JobSpec(job_id=str(uuid.uuid4()), variants=1, model=model, output=output)  # type: ignore[arg-type]
    submit_job(db, settings, f"SELECT generate_series(1, {chunks}) AS id", spec, 1)
    return spec.job_id


def test_scaler_queries_follow_the_ledger(db: psycopg.Connection, settings: Settings) -> None:
    assert backlog(settings) == (0, 0, 0)
    plain = record(db, settings, chunks=5)
    classified = record(db, settings, chunks=3, model="fashion-classifier")
    assert backlog(settings) == (8, 0, 0)  # pending chunks are backlog; nothing in flight yet

    claim(db, settings.model_copy(update={"dispatch_budget_chunks": 4}))  # 2 chunks of each job
    # dispatched chunks are still transform's backlog; inference counts only the model's job
    assert backlog(settings) == (8, 4, 2)

    cancel_job(db, plain)
    assert backlog(settings) == (3, 2, 2)
    cancel_job(db, classified)
    assert backlog(settings) == (0, 0, 0)


def test_webdataset_jobs_keep_no_upload_replica(db: psycopg.Connection, settings: Settings) -> None:
    record(db, settings, chunks=3, output="webdataset")
    claim(db, settings)
    assert backlog(settings) == (3, 0, 0)


def test_the_backlog_query_is_capped_so_a_huge_job_polls_cheaply(
    db: psycopg.Connection, settings: Settings
) -> None:
    record(db, settings, chunks=500)
    assert metric(settings, "transform") == 200  # LIMIT 200: 50 replicas x 4 chunks
