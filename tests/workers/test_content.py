"""Selecting by content (docs/content.md): embeddings recorded by a job with the shipped model, a
model's outputs computed once, similarity in plain SQL, and a PostgreSQL without pgvector."""

from __future__ import annotations

import json
import shutil
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import onnx
import psycopg
import pytest

from common.config import Settings
from common.db import connect
from common.embeddings import VECTOR_MISSING, vector_available
from common.errors import QueryError
from common.paths import MODELS_DIR
from common.storage import ObjectStore
from quarry import Quarry
from tests.conftest import SAMPLE, PrivateDatabase, run_cli, run_job
from tests.postgres import machine_url
from tests.stack import Stack

VECTOR_REFUSAL = f"error: {VECTOR_MISSING}"
SHIPPED = MODELS_DIR / "fashion-classifier.onnx"
SIMILAR = """SELECT s.id FROM styles s
JOIN embeddings e ON e.dataset = 'styles' AND e.id = s.id AND e.model = 'default'
WHERE s.gender = %(gender)s
ORDER BY e.embedding <=> (SELECT embedding FROM embeddings
                          WHERE dataset = 'styles' AND id = %(anchor)s AND model = 'default')
LIMIT %(limit)s"""


def finished(env: dict[str, str], query: str, *args: str) -> dict[str, Any]:
    """The summary of a job of `query` that ran to its end with no failed item."""
    code, summary = run_job(env, "--query", query, *args)
    assert code == 0, summary
    return summary


def results(db: psycopg.Connection, job_id: str) -> list[tuple]:  # type: ignore[type-arg]
    return db.execute(
        "SELECT image_id, variant, status, label, score, top_k::text FROM job_items WHERE job_id = %s"
        " ORDER BY image_id, variant",
        (job_id,),
    ).fetchall()


def ids_query(ids: list[int]) -> str:
    return f"SELECT id FROM styles WHERE id IN ({', '.join(map(str, ids))})"


@pytest.fixture
def sample_ids(db: psycopg.Connection, ingested: dict[str, str]) -> list[int]:
    """The sample's readable images, none of whose outputs the catalog keeps yet."""
    db.execute("TRUNCATE model_outputs")
    return [row[0] for row in db.execute("SELECT id FROM images WHERE status = 'stored' ORDER BY id")]


def test_a_job_with_the_default_model_records_an_embedding_per_image_and_runs_it_once(
    workers: Stack, db: psycopg.Connection, sample_ids: list[int]
) -> None:
    ids = sample_ids[:40]
    first = finished(workers.env, ids_query(ids), "--model", "default")
    assert (first["state"], first["done"], first["inferred"]) == ("finished", 40, 40)
    embedded = db.execute(
        "SELECT id, vector_dims(embedding) FROM embeddings WHERE dataset = 'styles' AND model = 'default'"
        " AND id = ANY(%s) ORDER BY id",
        (ids,),
    ).fetchall()
    assert embedded == [(i, 256) for i in ids]
    before = db.execute("SELECT id, embedding::text FROM embeddings WHERE id = ANY(%s) ORDER BY id", (ids,))
    before_rows = before.fetchall()

    second = finished(workers.env, ids_query(ids), "--model", "default")
    assert (second["state"], second["done"], second["inferred"]) == ("finished", 40, 0)
    assert results(db, second["job_id"]) == results(db, first["job_id"])
    after = db.execute("SELECT id, embedding::text FROM embeddings WHERE id = ANY(%s) ORDER BY id", (ids,))
    assert after.fetchall() == before_rows
    status = run_cli("status", second["job_id"], "--json", env=workers.env)
    assert json.loads(status.stdout)["inferred"] == 0

    third = finished(workers.env, ids_query(ids + sample_ids[40:41]), "--model", "default")
    assert (third["done"], third["inferred"]) == (41, 1)


def test_a_model_in_s3_is_the_same_model_as_its_bytes_say(
    workers: Stack, db: psycopg.Connection, store: ObjectStore, sample_ids: list[int]
) -> None:
    """`--model s3://...`: the shipped model's file, uploaded, is fetched by the pools and is the
    same model (its outputs are the catalog's, computed by the shipped one: nothing runs again)."""
    store.ensure_bucket("models")
    store.upload_file(str(MODELS_DIR / "fashion-classifier.onnx"), "models", "fashion.onnx", content_type="x")
    query = ids_query(sample_ids[:10])
    shipped = finished(workers.env, query, "--model", "default")
    fetched = finished(workers.env, query, "--model", "s3://models/fashion.onnx")
    assert (shipped["inferred"], fetched["inferred"], fetched["done"]) == (10, 0, 10)
    assert results(db, fetched["job_id"]) == results(db, shipped["job_id"])


def test_webdataset_output_takes_the_outputs_from_the_catalog_too(
    workers: Stack, db: psycopg.Connection, sample_ids: list[int]
) -> None:
    query = ids_query(sample_ids[:30])
    first = finished(workers.env, query, "--model", "default", "--output", "webdataset")
    second = finished(workers.env, query, "--model", "default", "--output", "webdataset")
    assert (first["inferred"], second["inferred"], second["done"]) == (30, 0, 30)
    assert results(db, second["job_id"]) == results(db, first["job_id"])


def test_a_model_changed_under_the_same_name_runs_again_and_replaces_its_embeddings(
    workers: Stack, db: psycopg.Connection, sample_ids: list[int], tmp_path: Path
) -> None:
    model = tmp_path / "classifier.onnx"
    shutil.copy(SHIPPED, model)
    query = ids_query(sample_ids[:20])
    first = finished(workers.env, query, "--model", str(model))
    assert first["inferred"] == 20
    digest = db.execute("SELECT digest FROM embedding_sets WHERE model = %s", (str(model),)).fetchone()

    proto = onnx.load(str(model))
    proto.metadata_props.add(key="note", value="retrained")  # other bytes, the same name
    onnx.save(proto, str(model))
    second = finished(workers.env, query, "--model", str(model))
    assert (second["done"], second["inferred"]) == (20, 20)
    sets = db.execute("SELECT digest FROM embedding_sets WHERE model = %s", (str(model),)).fetchall()
    assert len(sets) == 1 and digest is not None and sets[0][0] != digest[0]
    count = db.execute("SELECT count(*) FROM embeddings WHERE model = %s", (str(model),)).fetchone()
    assert count == (20,)


@pytest.fixture
def embedded_sample(workers: Stack, db: psycopg.Connection, sample_ids: list[int]) -> list[int]:
    """Every readable image of the sample with its embedding under `default`."""
    summary = finished(workers.env, ids_query(sample_ids), "--model", "default", "--output", "webdataset")
    assert (summary["state"], summary["done"]) == ("finished", len(sample_ids))
    return sample_ids


def test_the_nearest_images_share_the_article_type_far_above_chance(
    db: psycopg.Connection, embedded_sample: list[int]
) -> None:
    types = dict(
        db.execute("SELECT id, article_type FROM styles WHERE id = ANY(%s)", (embedded_sample,)).fetchall()
    )
    by_type: dict[str, list[int]] = defaultdict(list)
    for image_id, article_type in types.items():
        by_type[article_type].append(image_id)
    anchors = [i for members in by_type.values() if len(members) >= 5 for i in members]
    shared = total = 0
    for anchor in anchors:
        nearest = db.execute(
            "SELECT id FROM embeddings WHERE dataset = 'styles' AND model = 'default' AND id <> %(a)s"
            " ORDER BY embedding <=> (SELECT embedding FROM embeddings WHERE dataset = 'styles'"
            " AND model = 'default' AND id = %(a)s) LIMIT 10",
            {"a": anchor},
        ).fetchall()
        shared += sum(types[row[0]] == types[anchor] for row in nearest)
        total += len(nearest)
    rate = shared / total
    chance = sum((len(m) / len(types)) ** 2 for m in by_type.values())
    assert total == 10 * len(anchors) and len(anchors) >= 100
    assert rate > chance + 0.4, (rate, chance)


def test_a_similarity_query_selects_its_limit_through_run_and_sql_and_the_index_serves_it(
    workers: Stack, db: psycopg.Connection, settings: Settings, embedded_sample: list[int]
) -> None:
    anchor = db.execute(
        "SELECT min(id) FROM styles WHERE gender = 'Women' AND id = ANY(%s)", (embedded_sample,)
    )
    query = SIMILAR % {"gender": "'Women'", "anchor": anchor.fetchone()[0], "limit": 25}  # type: ignore[index]
    summary = finished(workers.env, query, "--augment", "resize(64, 64)", "--output", "webdataset")
    assert (summary["state"], summary["total"], summary["done"]) == ("finished", 25, 25)
    frame = Quarry.from_env().sql(query)
    assert len(frame) == 25 and set(frame["id"]) == {
        row[0] for row in db.execute("SELECT image_id FROM job_items WHERE job_id = %s", (summary["job_id"],))
    }
    with db.transaction(force_rollback=True):
        # 300 rows: the planner would rather sort them; this asks whether the index can serve it
        db.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off")
        plan = "\n".join(row[0] for row in db.execute("EXPLAIN " + query))
    table = db.execute(
        "SELECT id FROM embedding_sets WHERE dataset = 'styles' AND model = 'default'"
    ).fetchone()
    assert table is not None and f"using embeddings_{table[0]}_embedding_idx" in plan, plan


def test_without_pgvector_a_job_that_would_record_embeddings_is_refused_and_others_run(
    private_database: PrivateDatabase,
) -> None:
    """On this machine's PostgreSQL when it has no pgvector (Debian's 15 has none)."""
    with connect(machine_url("postgres"), autocommit=True) as admin:
        if vector_available(admin):
            pytest.skip("this machine's PostgreSQL has pgvector: there is no server without it to try")
    with private_database("novector", "bare", url_of=machine_url) as env:
        run_cli("ingest", env=env)
        refused = run_cli(
            "run", "--query", "SELECT id FROM styles LIMIT 5", "--model", "default", env=env, check=False
        )
        assert refused.returncode == 2  # refused, as every bad setting is
        assert refused.stderr.strip().splitlines() == [VECTOR_REFUSAL], refused.stderr
        with connect(env["DATABASE_URL"], autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        recorded = run_cli("run", "--query", "SELECT id FROM styles LIMIT 5", "--json", env=env)
        assert json.loads(recorded.stdout.strip().splitlines()[-1])["total"] == 5


def test_quarry_similar_gives_the_sql_of_the_nearest_images_under_a_condition(
    db: psycopg.Connection, embedded_sample: list[int]
) -> None:
    quarry = Quarry.from_env()
    anchor = embedded_sample[0]
    query = quarry.similar("styles", anchor, 8, where="s.gender = 'Women'")
    found = quarry.sql(query)
    assert len(found) == 8 and anchor not in set(found["id"])
    assert list(found["distance"]) == sorted(found["distance"])
    genders = db.execute("SELECT DISTINCT gender FROM styles WHERE id = ANY(%s)", (list(found["id"]),))
    assert genders.fetchall() == [("Women",)]
    with db.transaction(force_rollback=True):
        db.execute("SET LOCAL enable_indexscan = off")  # the exact answer: every distance computed
        exact = [row[0] for row in db.execute(query)]
    assert list(found["id"]) == exact
    with db.transaction(force_rollback=True):
        db.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off")
        plan = "\n".join(row[0] for row in db.execute("EXPLAIN " + query))
    assert "_embedding_idx" in plan, plan
    with pytest.raises(QueryError):
        quarry.similar("styles", anchor, 8, where="true; DELETE FROM styles")


def test_dropping_a_dataset_drops_its_embeddings(
    workers: Stack, db: psycopg.Connection, own_datasets: None, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((SAMPLE / "images").glob("*.jpg"))[:6]:
        shutil.copy(path, folder / path.name)
    name = f"drop_{uuid.uuid4().hex[:6]}"
    run_cli("ingest", str(folder), "--dataset", name, env=workers.env)
    summary = finished(workers.env, f"SELECT id FROM {name}", "--dataset", name, "--model", "default")
    assert summary["done"] == 6
    sets = db.execute("SELECT id FROM embedding_sets WHERE dataset = %s", (name,)).fetchall()
    assert len(sets) == 1
    assert db.execute("SELECT count(*) FROM embeddings WHERE dataset = %s", (name,)).fetchone() == (6,)

    run_cli("drop-dataset", name, env=workers.env)
    assert db.execute("SELECT count(*) FROM embedding_sets WHERE dataset = %s", (name,)).fetchone() == (0,)
    assert db.execute("SELECT to_regclass(%s)", (f"embeddings_{sets[0][0]}",)).fetchone() == (None,)
    assert db.execute("SELECT count(*) FROM embeddings WHERE dataset = %s", (name,)).fetchone() == (0,)
