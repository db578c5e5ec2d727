"""An interrupted first ingest (Ctrl-C while its units still register) drops the dataset it left
empty only once no job on it runs; against PostgreSQL (drop-dataset's refusal is in
tests/workers/test_newcomer.py)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from common.datasets import register_dataset
from common.ingest.tables import create_catalog
from quarry.datasets import drop_if_empty

pytestmark = pytest.mark.usefixtures("own_datasets")


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
