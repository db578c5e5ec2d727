import uuid

import psycopg
import pytest

from common.errors import UnknownJob
from common.jobs import ItemResult, create_job, job_progress, record_items


def test_a_redelivered_upload_does_not_undo_a_finished_item(db: psycopg.Connection) -> None:
    job_id = str(uuid.uuid4())
    create_job(db, job_id, "SELECT 1 AS id", {})
    db.execute("UPDATE jobs SET total = 2, state = 'enqueued' WHERE id = %s", (job_id,))
    record_items(
        db, job_id, [ItemResult(1, 0, "uploaded", "s3://b/k1"), ItemResult(2, 0, "failed", error="x")]
    )
    record_items(db, job_id, [ItemResult(1, 0, "done", "s3://b/k1", label="Shirts", score=0.9, top_k=[])])
    record_items(db, job_id, [ItemResult(1, 0, "uploaded", "s3://b/k1")])  # late duplicate
    progress = job_progress(db, job_id)
    assert progress is not None
    assert (progress.total, progress.done, progress.failed, progress.finished) == (2, 1, 1, True)
    assert db.execute(
        "SELECT label FROM job_items WHERE job_id = %s AND image_id = 1", (job_id,)
    ).fetchone() == ("Shirts",)


def test_results_for_an_unknown_job_are_refused_clearly(db: psycopg.Connection) -> None:
    with pytest.raises(UnknownJob, match="is not in this worker's database"):
        record_items(db, str(uuid.uuid4()), [ItemResult(1, 0, "done")])
