"""Messages are not trusted: anyone who reaches the broker can write one, so a stage runs with
the job's spec from PostgreSQL and writes or deletes only keys it derives itself. A forged upload
message naming another job writes under the recorded job's prefix; a forged staging key is not
deleted. A private database, broker and pools with no dispatcher: the test sends the messages."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from celery import Celery

from common.jobs import record_job
from common.jobspec import JobSpec
from common.ledger import Ticket, claim_chunks
from common.storage import ObjectStore
from common.transform import Output
from tests.conftest import SAMPLE, PrivateDatabase
from tests.stack import Stack, wait_until
from workers.routes import INFERENCE_SHARD, UPLOAD


@pytest.fixture(scope="module")
def private(private_database: PrivateDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A database of its own (no dispatcher reads it), a broker of its own, the upload and
    inference pools."""
    with private_database("messages", "schema") as env:
        stack = Stack(env, tmp_path_factory.mktemp("messages"))
        try:
            stack.start_redis()
            stack.start_pool("upload")
            stack.start_pool("inference")
            yield stack
        finally:
            stack.stop_all()


def dispatched_job(stack: Stack, spec: JobSpec) -> Ticket:
    """A recorded job of one chunk (image 1) dispatched once, as the dispatcher would leave it."""
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        record_job(conn, spec.job_id, "SELECT 1 AS id", spec.to_message(), [(0, [1], 1)])
        ((chunk, dispatch),) = claim_chunks(conn, spec.job_id, 1, 300)
    return Ticket(spec.job_id, chunk, dispatch)


def send(stack: Stack, task: str, args: list[object], queue: str) -> None:
    """A message written straight to the stack's broker (Celery prefers CELERY_BROKER_URL from
    the environment, the session's, over a broker given to the app: the connection is explicit)."""
    app = Celery()
    with app.connection_for_write(stack.env["CELERY_BROKER_URL"]) as connection:
        app.send_task(task, args=args, queue=queue, connection=connection)


def test_a_forged_spec_is_overruled_by_the_jobs_record(private: Stack, store: ObjectStore) -> None:
    spec = JobSpec(job_id=str(uuid.uuid4()))
    ticket = dispatched_job(private, spec)
    other = str(uuid.uuid4())
    forged = {**spec.to_message(), "job_id": other, "key_layout": "hashed"}
    image = sorted((SAMPLE / "images").glob("*.jpg"))[0].read_bytes()
    output = Output(1, 0, 0, image, "jpeg", "s3://raw/1.jpg").to_message()
    send(private, UPLOAD, [forged, ticket.to_message(), [output]], "upload")

    def recorded() -> str | None:
        with psycopg.connect(private.env["DATABASE_URL"]) as conn:
            row = conn.execute(
                "SELECT output_uri FROM job_items WHERE job_id = %s", (spec.job_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    wait_until(recorded, 60, "the upload to be recorded")
    bucket = private.env["OUTPUT_BUCKET"]
    assert recorded() == f"s3://{bucket}/{spec.job_id}/1-0.jpg"  # the record's job and layout
    assert store.list_keys(bucket, f"{other}/") == []
    logged = (private.log_dir / "worker-upload.log").read_text()
    assert "a message's spec differs from the job's record" in logged


def test_a_forged_staging_key_is_never_deleted(private: Stack, store: ObjectStore) -> None:
    spec = JobSpec(job_id=str(uuid.uuid4()), model="fashion-classifier", output="webdataset")
    ticket = dispatched_job(private, spec)
    bucket = private.env["OUTPUT_BUCKET"]
    victim = f"someone-elses/{uuid.uuid4().hex}.tar"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = sorted((SAMPLE / "images").glob("*.jpg"))[0].read_bytes()
        info = tarfile.TarInfo("1-0.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    store.put(bucket, victim, buffer.getvalue(), content_type="application/x-tar", metadata={})
    send(private, INFERENCE_SHARD, [spec.to_message(), ticket.to_message(), victim], "inference")

    def noted() -> str | None:
        with psycopg.connect(private.env["DATABASE_URL"]) as conn:
            row = conn.execute(
                "SELECT last_error FROM job_chunks WHERE job_id = %s", (spec.job_id,)
            ).fetchone()
        return None if row is None else row[0]

    wait_until(noted, 60, "the task's failure to be noted")
    assert "staging" in str(noted())  # it read the key it derived, which holds nothing
    assert victim in store.list_keys(bucket, "someone-elses/")
    assert f"a message named staging key {victim!r}" in (private.log_dir / "worker-inference.log").read_text()
