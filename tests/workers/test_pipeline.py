"""End to end through the real CLI, Redis, real worker processes, PostgreSQL and S3."""

import json

import psycopg
import pytest
from celery import Celery

from common.config import Settings
from common.storage import ObjectStore
from tests.conftest import WITH_IMAGES, raw_image, relocate, run_cli, run_job
from tests.stack import Stack, wait_until
from workers.routes import TRANSFORM

pytestmark = pytest.mark.usefixtures("workers")
SPEC = "hflip(p=0.5) | rotate(limit=15) | brightness_contrast(0.2, 0.2) | resize(96, 128)"


def results(env: dict[str, str], job_id: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in run_cli("results", job_id, env=env).stdout.splitlines()]


def objects(store: ObjectStore, bucket: str, job_id: str) -> dict[str, bytes]:
    return {key.split("/", 1)[1]: store.get(bucket, key) for key in store.list_keys(bucket, f"{job_id}/")}


def test_job_uploads_exactly_the_selected_images(
    ingested, store: ObjectStore, settings: Settings, db: psycopg.Connection
) -> None:
    code, summary = run_job(
        ingested, "--query", WITH_IMAGES + " AND s.master_category = 'Footwear'", "--chunk-size", "7"
    )
    selected = {row[0] for row in db.execute(WITH_IMAGES + " AND s.master_category = 'Footwear'")}
    assert code == 0
    assert summary["total"] == summary["done"] == len(selected) > 20 and summary["failed"] == 0
    stored = objects(store, settings.output_bucket, str(summary["job_id"]))
    assert set(stored) == {f"{image_id}-0.jpg" for image_id in selected}
    some_id = next(iter(selected))
    assert stored[f"{some_id}-0.jpg"] == raw_image(db, store, some_id)  # identity: same bytes
    status = json.loads(run_cli("status", str(summary["job_id"]), "--json", env=ingested).stdout)
    assert status["done"] == status["total"] == len(selected)
    chunks = db.execute(
        "SELECT cardinality(image_ids) FROM job_chunks WHERE job_id = %s ORDER BY chunk_index",
        (summary["job_id"],),
    )
    sizes = [row[0] for row in chunks]
    assert sizes == [7] * (len(selected) // 7) + ([len(selected) % 7] if len(selected) % 7 else [])


def test_missing_images_fail_alone_with_no_image(ingested, settings: Settings) -> None:
    code, summary = run_job(ingested, "--query", "SELECT id FROM styles")
    assert code == 1  # some images failed
    assert (summary["total"], summary["done"], summary["failed"]) == (300, 295, 5)
    failed = {
        row["image_id"]: row["error"]
        for row in results(ingested, str(summary["job_id"]))
        if row["status"] == "failed"
    }
    assert failed == {i: "transform: no image" for i in (48570, 6383, 49828, 8551, 44065)}


def test_a_corrupt_object_fails_its_item_and_the_chunk_goes_on(
    ingested, store: ObjectStore, settings: Settings, db: psycopg.Connection
) -> None:
    victim = db.execute("SELECT id FROM images WHERE status = 'stored' ORDER BY id LIMIT 1").fetchone()[0]
    store.put(settings.raw_bucket, "corrupt.jpg", b"\xff\xd8garbage", content_type="image/jpeg", metadata={})
    undo = relocate(db, victim, f"s3://{settings.raw_bucket}/corrupt.jpg")
    try:
        code, summary = run_job(
            ingested,
            "--query",
            WITH_IMAGES + " ORDER BY s.id LIMIT 20",
            "--augment",
            "hflip",
            "--chunk-size",
            "20",
        )
    finally:
        undo()
    assert code == 1 and (summary["done"], summary["failed"]) == (19, 1)
    (failure,) = [row for row in results(ingested, str(summary["job_id"])) if row["status"] == "failed"]
    assert failure["image_id"] == victim and "not a decodable image" in failure["error"]


def test_a_chunk_delivered_twice_at_once_leaves_the_same_objects_rows_and_counts(
    ingested, store: ObjectStore, settings: Settings, db: psycopg.Connection, workers: Stack
) -> None:
    _code, summary = run_job(
        ingested,
        "--query",
        WITH_IMAGES + " ORDER BY s.id LIMIT 12",
        "--augment",
        SPEC,
        "--variants",
        "2",
        "--chunk-size",
        "12",
    )
    job_id = str(summary["job_id"])
    before_objects = objects(store, settings.output_bucket, job_id)
    rows_sql = (
        "SELECT image_id, variant, status, output_uri, updated_at FROM job_items "
        "WHERE job_id = %s ORDER BY 1, 2"
    )
    before_rows = db.execute(rows_sql, (job_id,)).fetchall()
    # As if the chunk had been dispatched again before its results were in: forget them, then
    # deliver the same message twice; both copies run, in parallel.
    db.execute(
        "UPDATE job_chunks SET state = 'dispatched', done = 0, done_mask = NULL WHERE job_id = %s", (job_id,)
    )
    db.execute("UPDATE jobs SET state = 'running', done = 0, finished_at = NULL WHERE id = %s", (job_id,))
    spec = db.execute("SELECT spec FROM jobs WHERE id = %s", (job_id,)).fetchone()[0]
    ticket = {"job_id": job_id, "chunk": 0, "dispatch": 1}
    sender = Celery(broker=settings.celery_broker_url)
    for _ in range(2):
        sender.send_task(TRANSFORM, args=[spec, ticket], queue="transform")
    wait_until(  # both copies ran to the end: nothing queued, nothing taken and not acked
        lambda: (
            workers.drained()
            and json.loads(run_cli("status", job_id, "--json", env=ingested).stdout)["state"] == "finished"
        ),
        60,
        "the redelivered chunk and its copy to finish",
    )
    rows = db.execute(rows_sql, (job_id,)).fetchall()
    assert [row[:4] for row in rows] == [row[:4] for row in before_rows]
    assert all(after[4] > prior[4] for after, prior in zip(rows, before_rows, strict=True))
    assert len(rows) == 24
    assert objects(store, settings.output_bucket, job_id) == before_objects
    status = json.loads(run_cli("status", job_id, "--json", env=ingested).stdout)
    assert (status["total"], status["done"], status["failed"]) == (24, 24, 0)


def test_two_jobs_with_the_same_spec_and_seed_are_byte_identical(
    ingested, store: ObjectStore, settings: Settings
) -> None:
    args = (
        "--query",
        WITH_IMAGES + " AND s.master_category = 'Accessories'",
        "--augment",
        SPEC,
        "--variants",
        "2",
        "--seed",
        "42",
        "--keep-original",
    )
    first = run_job(ingested, *args)[1]
    second = run_job(ingested, *args)[1]
    third = run_job(ingested, *args[:-3], "--seed", "43")[1]
    a = objects(store, settings.output_bucket, str(first["job_id"]))
    b = objects(store, settings.output_bucket, str(second["job_id"]))
    c = objects(store, settings.output_bucket, str(third["job_id"]))
    assert first["done"] == first["total"] == len(a) > 40
    assert a == b
    assert set(a) == set(c) and a != c
    assert all(key.endswith(("-0.jpg", "-1.jpg")) for key in a)


def test_inference_predictions_beat_the_majority_baseline(ingested, db: psycopg.Connection) -> None:
    code, summary = run_job(ingested, "--query", WITH_IMAGES, "--model", "default", "--top-k", "3")
    assert code == 0 and summary["done"] == summary["total"] == 295
    rows = results(ingested, str(summary["job_id"]))
    assert all(len(row["top_k"]) == 3 and 0 < row["score"] <= 1 for row in rows)
    accuracy = db.execute(
        "SELECT avg((p.label = s.article_type)::int) FROM predictions p JOIN styles s ON s.id = p.image_id "
        "WHERE p.job_id = %s",
        (summary["job_id"],),
    ).fetchone()[0]
    majority = db.execute(
        "SELECT max(n)::float / sum(n) FROM (SELECT count(*) AS n FROM styles s JOIN images i USING (id) "
        "WHERE i.status = 'stored' GROUP BY s.article_type) t"
    ).fetchone()[0]
    assert float(accuracy) > majority + 0.4, (accuracy, majority)
