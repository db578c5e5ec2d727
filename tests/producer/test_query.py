import psycopg
import pytest

from common.errors import QueryError
from producer.query import check_query, stream_ids
from tests.conftest import run_cli


@pytest.fixture
def numbers(db: psycopg.Connection) -> str:
    db.execute("DROP TABLE IF EXISTS numbers")
    db.execute(
        "CREATE TABLE numbers AS SELECT g AS id, g % 7 AS bucket, g::text AS label "
        "FROM generate_series(1, 2500) AS g"
    )
    return "numbers"


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("DROP TABLE numbers", "only SELECT queries are allowed; this one starts with DROP"),
        ("UPDATE numbers SET id = 0", "starts with UPDATE"),
        ("  -- comment\n INSERT INTO numbers VALUES (1)", "starts with INSERT"),
        ("", "empty"),
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
        ("SELECT id FROM numbers; DROP TABLE numbers", "syntax error"),
        ("SELECT id, nextval('jobs_seq') FROM numbers", "query failed"),
        ("WITH gone AS (DELETE FROM numbers RETURNING id) SELECT id FROM gone", "query failed"),
        ("SELECT id FROM numbers FOR UPDATE", "it would write"),
        ("SELECT id FROM numbers WHERE pg_sleep(2) IS NOT NULL", "statement timeout of 1 s"),
    ],
)
def test_refused_queries_raise_before_anything_streams(
    settings, numbers: str, db: psycopg.Connection, sql: str, message: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(QueryError, match=message), stream_ids(settings.database_url, sql, 1, 100):
        pass
    assert db.execute("SELECT count(*) FROM numbers").fetchone() == (2500,)


def test_ids_stream_distinct_and_complete(settings, numbers: str) -> None:  # type: ignore[no-untyped-def]
    sql = "SELECT id FROM numbers UNION ALL SELECT id FROM numbers WHERE bucket = 0 UNION ALL SELECT NULL"
    with stream_ids(settings.database_url, sql, 10, batch=100) as ids:
        seen = list(ids)
    assert sorted(seen) == list(range(1, 2501))


def test_cli_refuses_a_write_with_exit_2_and_enqueues_nothing(test_env, numbers: str, db) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("run", "--query", "DELETE FROM numbers", env=test_env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: only SELECT queries are allowed; this one starts with DELETE"
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
