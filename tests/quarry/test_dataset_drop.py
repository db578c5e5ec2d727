"""An interrupted first ingest (Ctrl-C while its units still register) drops the dataset it left
empty only once no job on it runs; against PostgreSQL (drop-dataset's refusal is in
tests/workers/test_newcomer.py). The sample's dataset, `styles`, dropped and ingested again."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from common.datasets import register_dataset
from common.ingest.tables import create_catalog
from quarry.datasets import drop_if_empty
from tests.conftest import PrivateDatabase, run_cli


@pytest.mark.usefixtures("own_datasets")
def test_an_empty_dataset_with_a_running_job_is_kept(db: psycopg.Connection) -> None:
    name = f"held_{uuid.uuid4().hex[:6]}"
    with db.transaction():
        create_catalog(db, name, {"key": "text", "caption": "text"}, "id", "key")
        register_dataset(db, name, "id", "key", None, "webdataset")
    job = uuid.uuid4()
    db.execute(  # an ingest job whose units are still registering: recorded, nothing done yet
        "INSERT INTO jobs (id, query, spec, total, recorded_at) VALUES (%s, 'ingest', %s, 1, now())",
        (job, Jsonb({"dataset": name, "kind": "ingest"})),
    )

    assert drop_if_empty(db, name) is False
    assert db.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone() == (True,)

    db.execute("UPDATE jobs SET state = 'cancelled' WHERE id = %s", (job,))
    assert drop_if_empty(db, name) is True
    assert db.execute("SELECT count(*) FROM datasets WHERE name = %s", (name,)).fetchone() == (0,)


def test_the_sample_dataset_dropped_is_ingested_again(private_database: PrivateDatabase) -> None:
    """Every command grants the query role its reads first; `styles` gone is passed over."""
    bucket = f"raw-redrop-{uuid.uuid4().hex[:6]}"  # its shards are this test's alone to delete
    with private_database("redrop", "schema", RAW_BUCKET=bucket) as env:
        run_cli("ingest", env=env)
        dropped = run_cli("drop-dataset", "styles", env=env)
        assert dropped.stdout.startswith("dataset styles dropped ("), dropped.stdout
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            assert conn.execute("SELECT to_regclass('styles')").fetchone() == (None,)
        again = run_cli("ingest", env=env, check=False)
        assert again.returncode == 0, again.stderr
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            stored = conn.execute("SELECT count(*) FROM images WHERE status = 'stored'").fetchone()
        assert stored == (295,)
