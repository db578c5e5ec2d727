"""retry, cancel, jobs and two jobs at once, through the real CLI, pools and dispatcher."""

import json
import time

import psycopg
import pytest

from common.config import Settings
from common.storage import ObjectStore
from tests.conftest import WITH_IMAGES, raw_image, relocate, run_cli
from tests.stack import Stack, free_port, wait_until

pytestmark = pytest.mark.usefixtures("workers")


def status(env: dict[str, str], job_id: str) -> dict:  # type: ignore[type-arg]
    return json.loads(run_cli("status", job_id, "--json", env=env).stdout)


def submit(env: dict[str, str], query: str, *args: str) -> str:
    return run_cli("run", "--query", query, *args, env=env).stdout.strip().splitlines()[-1]


def test_retry_after_a_fix_reruns_exactly_the_failed_items(
    ingested, store: ObjectStore, settings: Settings, db: psycopg.Connection
) -> None:
    victims = db.execute("SELECT id FROM images WHERE status = 'stored' ORDER BY id LIMIT 3").fetchall()
    originals = {f"moved/{image_id}.jpg": raw_image(db, store, image_id) for (image_id,) in victims}
    undo = [  # the cause: the images' sources are objects missing from S3
        relocate(db, image_id, f"s3://{settings.raw_bucket}/{key}")
        for (image_id,), key in zip(victims, originals, strict=True)
    ]
    try:
        waited = run_cli(
            "run",
            "--query",
            WITH_IMAGES + " ORDER BY s.id LIMIT 40",
            "--chunk-size",
            "10",
            "--wait",
            env=ingested,
            check=False,
        )
        assert waited.returncode == 1, waited.stderr  # --wait: items failed, so a failing exit
        job_id = waited.stdout.strip().splitlines()[-1]
        for key, data in originals.items():  # the fix
            store.put(settings.raw_bucket, key, data, content_type="image/jpeg", metadata={})
        first = status(ingested, job_id)
        assert (first["state"], first["done"], first["failed"]) == ("finished", 37, 3)
        kept = dict(
            db.execute(
                "SELECT image_id, updated_at FROM job_items WHERE job_id = %s AND status = 'done'", (job_id,)
            )
        )
        out = run_cli("retry", job_id, env=ingested).stdout.strip()
        assert out == f"job {job_id}: 3 failed items in 1 chunks sent again"
        wait_until(lambda: status(ingested, job_id)["state"] == "finished", 60, "the retried job")
        final = status(ingested, job_id)
        assert (final["done"], final["failed"]) == (40, 0)
        after = dict(db.execute("SELECT image_id, updated_at FROM job_items WHERE job_id = %s", (job_id,)))
        assert {i: after[i] for i in kept} == kept  # the 37 done items were not redone
        assert set(after) - set(kept) == {image_id for (image_id,) in victims}
        assert len(store.list_keys(settings.output_bucket, f"{job_id}/")) == 40
    finally:
        for put_back in undo:
            put_back()


def test_cancel_stops_a_running_job_and_jobs_lists_it(ingested, workers: Stack) -> None:
    job_id = submit(
        ingested, WITH_IMAGES, "--chunk-size", "1", "--variants", "3", "--augment", "rotate(limit=30)"
    )
    wait_until(lambda: status(ingested, job_id)["done"] > 0, 60, "first items")
    assert run_cli("cancel", job_id, env=ingested).stdout.strip() == f"job {job_id}: cancelled"
    wait_until(workers.drained, 120, "the queues to drain")  # the stages drop the job's messages
    settled = status(ingested, job_id)
    workers.wait_ticked()  # a dispatcher tick later, nothing more was sent
    assert workers.drained()
    later = status(ingested, job_id)
    assert later["state"] == "cancelled" and later["done"] == settled["done"] < later["total"]
    listed = [json.loads(line) for line in run_cli("jobs", "--json", env=ingested).stdout.splitlines()]
    assert {"job_id": job_id, "state": "cancelled"}.items() <= listed[0].items()
    assert "not running" in run_cli("cancel", job_id, env=ingested).stdout


def test_two_jobs_submitted_together_both_progress(ingested) -> None:
    args = ("--chunk-size", "1", "--augment", "hflip | resize(64, 64)")
    first, second = submit(ingested, WITH_IMAGES, *args), submit(ingested, WITH_IMAGES, *args)
    both_moving = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        a, b = status(ingested, first), status(ingested, second)
        if a["done"] > 0 and b["done"] > 0 and a["state"] == b["state"] == "running":
            both_moving = True
        if a["state"] == b["state"] == "finished":
            break
        time.sleep(0.3)
    assert both_moving, "one job waited for the other"
    assert status(ingested, first)["done"] == status(ingested, second)["done"] == 295


def test_commands_refuse_unknown_jobs_with_one_line(ingested) -> None:
    for command in ("status", "cancel", "retry", "results"):
        result = run_cli(command, "00000000-0000-0000-0000-000000000000", env=ingested, check=False)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip() == "error: no job 00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize(
    ("args", "variable", "message"),
    [
        (("dispatch", "--ticks", "1"), "CELERY_BROKER_URL", "error: cannot reach the broker at redis://"),
        (("jobs",), "DATABASE_URL", "error: cannot connect to PostgreSQL"),
        (("ingest",), "S3_ENDPOINT_URL", "error: S3 endpoint http://127.0.0.1:"),
    ],
)
def test_an_unreachable_service_is_one_line_and_a_failing_exit(
    test_env: dict[str, str], args: tuple[str, ...], variable: str, message: str
) -> None:
    port = free_port()  # nothing listens there
    urls = {
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/quarry",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    result = run_cli(*args, env={**test_env, variable: urls[variable]}, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
