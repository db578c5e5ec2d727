"""The Python API against the real stack: every method, and one clear error for each bad input."""

from __future__ import annotations

import psycopg
import pytest

from common.config import Settings
from common.errors import (
    DatabaseUnavailable,
    ModelError,
    NoSuchJob,
    QueryError,
    SpecError,
    StorageUnavailable,
    UserError,
)
from quarry import Job, Preview, Quarry
from tests.conftest import WITH_IMAGES
from tests.stack import free_port

pytestmark = pytest.mark.usefixtures("workers")
FOOTWEAR = WITH_IMAGES + " AND s.master_category = 'Footwear'"
SPEC = "hflip(p=0.5) | resize(64, 64)"


@pytest.fixture
def quarry(ingested: dict[str, str], settings: Settings) -> Quarry:
    return Quarry(settings)


def job_count(db: psycopg.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])  # type: ignore[index]


def test_a_job_from_run_to_results(quarry: Quarry, db: psycopg.Connection) -> None:
    selected = {row[0] for row in db.execute(FOOTWEAR)}
    job = quarry.run(FOOTWEAR + " UNION ALL SELECT 999999999", augment=SPEC, variants=2, model="default")
    assert isinstance(job, Job)
    final = job.wait(progress=False, timeout=180)
    assert final.finished and final.total == 2 * (len(selected) + 1) and final.failed == 2

    results = job.results()
    assert len(results) == final.total and set(results["status"]) == {"done", "failed"}
    assert results[results["status"] == "done"]["label"].notna().all()
    joined = job.results(catalog=True)
    assert {"article_type", "master_category"} <= set(joined.columns)
    assert set(joined.dropna(subset=["master_category"])["master_category"]) == {"Footwear"}
    failures = job.failures()
    assert failures.to_dict("records") == [
        {"image_id": 999999999, "variant": v, "error": "transform: no image"} for v in (0, 1)
    ]
    assert job.retry() == (1, 2)  # exactly the failed items are sent again
    assert job.wait(progress=False, timeout=120).failed == 2
    assert quarry.job(job.id).status().total == final.total
    assert job.id in set(quarry.jobs()["job_id"])


def test_cancel_stops_a_running_job(quarry: Quarry) -> None:
    job = quarry.run(WITH_IMAGES, augment="resize(512, 512)", variants=4, chunk_size=5)
    assert job.cancel() is True
    assert job.status().state == "cancelled"
    assert job.cancel() is False  # not running any more


def test_sql_reads_the_catalog_and_refuses_writes(quarry: Quarry) -> None:
    frame = quarry.sql("SELECT master_category, count(*) AS n FROM styles GROUP BY 1 ORDER BY 2 DESC")
    assert list(frame.columns) == ["master_category", "n"] and frame["n"].sum() > 0
    assert len(quarry.sql("SELECT id FROM styles", limit=3)) == 3
    with pytest.raises(QueryError):
        quarry.sql("DELETE FROM styles")
    with pytest.raises(QueryError, match=r"the query writes \(DELETE\)"):
        quarry.sql("WITH gone AS (DELETE FROM styles RETURNING id) SELECT id FROM gone")


def test_preview_renders_the_variants_inline(quarry: Quarry, db: psycopg.Connection) -> None:
    image_id = db.execute(FOOTWEAR + " LIMIT 1").fetchone()[0]  # type: ignore[index]
    preview = quarry.preview(image_id, augment=SPEC, variants=3)
    assert isinstance(preview, Preview) and preview._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    assert preview.pixels.shape[1] > 3 * 64  # the original and three variants side by side
    with pytest.raises(UserError, match="no image"):
        quarry.preview(999999999)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda q: q.run("DELETE FROM styles"), QueryError, "not a single SELECT: this one is DELETE"),
        (lambda q: q.run(WITH_IMAGES, augment="explode(3)"), SpecError, "explode"),
        (lambda q: q.run(WITH_IMAGES, model="no-such-model"), ModelError, "no model 'no-such-model'"),
        (lambda q: q.run(WITH_IMAGES, variants=0), UserError, "variants must be an integer from 1 to 64"),
        (lambda q: q.run(WITH_IMAGES, output="zip"), UserError, "output must be one of"),  # type: ignore[arg-type]
        (lambda q: q.run(WITH_IMAGES, shard_size=10), UserError, "webdataset only"),
    ],
    ids=["writing-sql", "unknown-op", "missing-model", "bad-variants", "bad-output", "shard-size-for-files"],
)
def test_a_refused_job_raises_one_clear_error_and_records_nothing(
    quarry: Quarry, db: psycopg.Connection, call, error: type[Exception], message: str
) -> None:  # type: ignore[no-untyped-def]
    before = job_count(db)
    with pytest.raises(error, match=message) as raised:
        call(quarry)
    assert "\n" not in str(raised.value)
    assert job_count(db) == before


def test_unknown_and_malformed_job_ids(quarry: Quarry) -> None:
    with pytest.raises(NoSuchJob, match="no job 00000000-0000-0000-0000-000000000000"):
        quarry.job("00000000-0000-0000-0000-000000000000")
    with pytest.raises(UserError, match="not a job id: 'nope'"):
        quarry.job("nope")


def test_unreachable_services_raise_one_line(settings: Settings) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(DatabaseUnavailable, match="cannot connect to PostgreSQL") as raised:
        Quarry(settings, database_url=f"postgresql://postgres@127.0.0.1:{port}/quarry").jobs()
    assert "\n" not in str(raised.value)
    with pytest.raises(StorageUnavailable, match=f"S3 endpoint http://127.0.0.1:{port}"):
        Quarry(settings, s3_endpoint_url=f"http://127.0.0.1:{port}").init()
