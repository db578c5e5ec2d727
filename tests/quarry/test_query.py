import uuid

import psycopg
import pytest

from common.errors import QueryError, UserError
from common.jobspec import JobSpec
from quarry.query import check_query
from quarry.submit import submit_job
from tests.conftest import run_cli


@pytest.fixture
def numbers(db: psycopg.Connection) -> str:
    db.execute("DROP TABLE IF EXISTS numbers")
    db.execute(
        "CREATE TABLE numbers AS SELECT g AS id, g % 7 AS bucket, g::text AS label "
        "FROM generate_series(1, 2500) AS g"
    )
    db.execute("GRANT SELECT ON numbers TO quarry_reader")  # how a team is given more to read
    return "numbers"


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("DROP TABLE numbers", "not a single SELECT: this one is DROP"),
        ("UPDATE numbers SET id = 0", "this one is UPDATE"),
        ("  -- comment\n INSERT INTO numbers VALUES (1)", "this one is INSERT"),
        ("", "empty"),
        ("  -- only a comment", "empty"),
        ("SELECT id FROM numbers WHERE", "query refused: syntax error at end of input"),
    ],
)
def test_check_query_refuses_non_reads(sql: str, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        check_query(sql)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT bucket FROM numbers", "no id column"),
        ("SELECT label AS id FROM numbers", "must be an integer"),
        ("SELECT nope FROM numbers", 'column "nope" does not exist'),
        ("SELECT id FROM numbers; DROP TABLE numbers", "not a single SELECT: the text holds 2 statements"),
        ("SELECT id, nextval('jobs_seq') FROM numbers", r"the query calls nextval\(\), which is not allowed"),
        (
            "WITH gone AS (DELETE FROM numbers RETURNING id) SELECT id FROM gone",
            r"the query writes \(DELETE\)",
        ),
        ("SELECT id FROM numbers FOR UPDATE", "the query locks rows"),
        ("SELECT id FROM numbers WHERE pg_sleep(2) IS NOT NULL", "statement timeout of 1 s"),
    ],
)
def test_refused_queries_raise_and_record_nothing(
    settings, numbers: str, db: psycopg.Connection, sql: str, message: str
) -> None:  # type: ignore[no-untyped-def]
    spec = JobSpec(job_id=str(uuid.uuid4()))
    with pytest.raises(QueryError, match=message):
        submit_job(db, settings.model_copy(update={"query_timeout_s": 1}), sql, spec, 100)
    assert db.execute("SELECT count(*) FROM numbers").fetchone() == (2500,)
    assert db.execute("SELECT count(*) FROM jobs WHERE id = %s", (spec.job_id,)).fetchone() == (0,)


def test_chunks_hold_the_distinct_ids_sorted_and_complete(settings, numbers: str, db) -> None:  # type: ignore[no-untyped-def]
    sql = "SELECT id FROM numbers UNION ALL SELECT id FROM numbers WHERE bucket = 0 UNION ALL SELECT NULL"
    spec = JobSpec(job_id=str(uuid.uuid4()), variants=3)
    assert submit_job(db, settings, sql, spec, 1000) == (3, 7500)
    rows = db.execute(
        "SELECT chunk_index, image_ids, items FROM job_chunks WHERE job_id = %s ORDER BY 1", (spec.job_id,)
    ).fetchall()
    assert [(index, items) for index, _, items in rows] == [(0, 3000), (1, 3000), (2, 1500)]
    assert [i for _, ids, _ in rows for i in ids] == list(range(1, 2501))


def test_cli_refuses_a_write_with_exit_2_and_enqueues_nothing(test_env, numbers: str, db) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("run", "--query", "DELETE FROM numbers", env=test_env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: not a single SELECT: this one is DELETE (only SELECT, WITH, VALUES, TABLE are allowed)"
    ]
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_cli_refuses_a_bad_spec_and_a_bad_model_with_exit_2(test_env, db) -> None:  # type: ignore[no-untyped-def]
    bad_spec = run_cli(
        "run", "--query", "SELECT 1 AS id", "--augment", "rotate(limit=999)", env=test_env, check=False
    )
    assert bad_spec.returncode == 2 and "rotate: argument 'limit'" in bad_spec.stderr
    bad_model = run_cli(
        "run", "--query", "SELECT 1 AS id", "--model", "/nope.onnx", env=test_env, check=False
    )
    assert bad_model.returncode == 2 and "no model '/nope.onnx'" in bad_model.stderr
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


@pytest.mark.parametrize(
    ("text", "statement"),
    [
        ("SELECT 1 AS id;", "SELECT 1 AS id"),
        ("-- é lead\nSELECT 'Café ☕' AS t, 1 AS id; -- trailing é", "SELECT 'Café ☕' AS t, 1 AS id"),
        ("/* ☕ */ VALUES (1)", "VALUES (1)"),
    ],
)
def test_check_query_returns_the_statement_whatever_the_characters(text: str, statement: str) -> None:
    assert check_query(text) == statement


def test_the_tables_a_query_reads_come_from_its_parse_tree() -> None:
    from quarry.slicing import parse_tree, relations

    def tables_named(text: str) -> set[str]:
        return set(relations(parse_tree(check_query(text))))

    assert tables_named("SELECT s.id FROM styles s JOIN images i USING (id) WHERE i.status = 'stored'") == {
        "styles",
        "images",
    }
    assert tables_named("WITH picked AS (SELECT id FROM lookbook) SELECT id FROM picked") == {"lookbook"}
    assert tables_named("SELECT id FROM other.lookbook UNION SELECT 1 AS id") == set()  # another schema
    assert tables_named("SELECT id FROM styles WHERE id IN (SELECT id FROM lookbook2)") == {
        "styles",
        "lookbook2",
    }


def test_a_job_names_its_dataset_by_the_table_its_query_reads(db: psycopg.Connection) -> None:
    """With two datasets and no --dataset, the one whose table the query reads; else one line."""
    from common.datasets import dataset_names, default_dataset

    names = ["probe_a", "probe_b"]
    for name in names:
        db.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY)")
        db.execute("INSERT INTO datasets (name, id_column, format) VALUES (%s, 'id', 'folder')", (name,))
    try:
        others = [n for n in dataset_names(db) if n not in names]
        assert default_dataset(db, {"probe_b", "images"}) == "probe_b"
        with pytest.raises(UserError, match=r"reads 2 datasets' tables \(probe_a, probe_b\)"):
            default_dataset(db, {"probe_a", "probe_b"})
        with pytest.raises(UserError, match=rf"{2 + len(others)} datasets \(.*\) and the query reads none"):
            default_dataset(db, {"pg_class"})
    finally:
        for name in names:
            db.execute("DELETE FROM datasets WHERE name = %s", (name,))
            db.execute(f"DROP TABLE {name}")
