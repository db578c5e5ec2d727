"""User SQL reads the catalog and nothing else, enforced by PostgreSQL: every way out of the
selection statement is refused with one line, through the CLI (exit 2) and the API (QueryError),
while a canary table and a sentinel session of the owner stay untouched; honest queries work."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from common.config import Settings
from common.errors import QuarryError
from common.jobs import cancel_job, record_job
from common.ledger import ItemResult, upsert_items
from common.roles import GUARDED_BUILTINS
from quarry import Quarry
from tests.conftest import run_cli
from tests.stack import wait_until

SENTINEL = "quarry-sentinel"
READER_SENTINEL = "quarry-reader-sentinel"  # a session of the query role: another user's selection


@pytest.fixture
def guarded(
    ingested: dict[str, str], db: psycopg.Connection, settings: Settings
) -> Iterator[psycopg.Connection]:
    """A canary table of the owner's, a sentinel session of the owner's and one of the query
    role's (another user's selection), checked after the test: both alive, no advisory lock held,
    the canary whole, no job recorded."""
    db.execute("DROP TABLE IF EXISTS canary")
    db.execute("CREATE TABLE canary AS SELECT generate_series(1, 3) AS id")
    reader_url = settings.query_database_url
    with (
        psycopg.connect(ingested["DATABASE_URL"], autocommit=True, application_name=SENTINEL) as sentinel,
        psycopg.connect(reader_url, autocommit=True, application_name=READER_SENTINEL) as reader,
    ):
        yield sentinel
        assert sentinel.execute("SELECT 1").fetchone() == (1,), "the sentinel session was ended"
        assert reader.execute("SELECT 1").fetchone() == (1,), "the query role's session was ended"
    assert db.execute("SELECT count(*) FROM canary").fetchone() == (3,)
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,), "a refused query recorded a job"
    assert db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)
    db.execute("DROP TABLE canary")


def sentinel_pid(db: psycopg.Connection, name: str = SENTINEL) -> int:
    row = db.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


ESCAPES = {
    "second statement": "SELECT id FROM styles; DROP TABLE canary",
    "closing the parentheses": "SELECT id FROM styles) AS q; DROP TABLE canary; SELECT (1",
    "behind a comment": "SELECT id FROM styles /* ) */; DROP TABLE canary -- (",
    "a line comment and a newline": "SELECT id FROM styles --\n; DELETE FROM canary",
    "data-modifying CTE": "WITH gone AS (DELETE FROM canary RETURNING id) SELECT id FROM gone",
    "nested data-modifying CTE": "SELECT id FROM"
    " (WITH g AS (UPDATE canary SET id = 0 RETURNING id) SELECT id FROM g) s",
    "SELECT INTO": "SELECT id INTO stolen FROM styles",
    "locking clause": "SELECT id FROM styles FOR UPDATE",
    "locking in a subquery": "SELECT id FROM (SELECT id FROM styles FOR SHARE) s",
    "server file": "SELECT length(pg_read_file('/etc/passwd'))::int AS id",
    "server binary file": "SELECT length(pg_read_binary_file('/etc/hostname'))::int AS id",
    "server directory": "SELECT 1 AS id FROM pg_ls_dir('.')",
    "server file status": "SELECT (pg_stat_file('/etc/passwd')).size::int AS id",
    "large object import": "SELECT lo_import('/etc/passwd')::int AS id",
    "large object create": "SELECT lo_create(0)::int AS id",
    "settings changed": "SELECT id FROM styles WHERE set_config('statement_timeout', '0', false) IS NOT NULL",
    "role changed": "SELECT id FROM styles WHERE set_config('role', 'postgres', true) IS NOT NULL",
    "advisory lock held": "SELECT id FROM styles WHERE pg_advisory_lock(20904) IS NOT NULL",
    "ledger: jobs": "SELECT 1 AS id FROM jobs",
    "ledger: job_chunks": "SELECT chunk_index AS id FROM job_chunks",
    "ledger: job_items": "SELECT image_id AS id FROM job_items",
    "ledger through a CTE": "WITH j AS (SELECT * FROM dispatchers) SELECT 1 AS id FROM j",
    "DDL": "CREATE TABLE stolen AS SELECT id FROM styles",
    "COPY to a file": "COPY styles TO '/tmp/stolen.csv'",
    "a qualified session function": "SELECT id FROM styles"
    " WHERE pg_catalog.set_config('work_mem', '1GB', false) > ''",
    "SQL text: query_to_xml": "SELECT 1 AS id"
    " FROM query_to_xml('SELECT pg_advisory_lock(20904)', true, true, '') x",
    "SQL text: a setting through query_to_xml": "SELECT 1 AS id"
    " WHERE query_to_xml('SELECT set_config(''work_mem'', ''4GB'', false)', true, true, '') IS NOT NULL",
    "SQL text: query_to_xmlschema": "SELECT 1 AS id"
    " WHERE query_to_xmlschema('SELECT 1', true, true, '') IS NOT NULL",
    "SQL text: query_to_xml_and_xmlschema": "SELECT 1 AS id"
    " WHERE query_to_xml_and_xmlschema('SELECT pg_advisory_lock(1)', true, true, '') IS NOT NULL",
    "SQL text: cursor_to_xml": "SELECT 1 AS id WHERE cursor_to_xml('c', 1, true, true, '') IS NOT NULL",
    "SQL text: cursor_to_xmlschema": "SELECT 1 AS id"
    " WHERE cursor_to_xmlschema('c', true, true, '') IS NOT NULL",
    "SQL text: ts_stat": "SELECT 1 AS id FROM ts_stat('SELECT to_tsvector(pg_advisory_lock(1)::text)')",
    "SQL text: ts_rewrite": "SELECT 1 AS id"
    " WHERE ts_rewrite('a'::tsquery, 'SELECT pg_notify($$x$$, $$y$$)') IS NULL",
    "ledger through table_to_xml": "SELECT 1 AS id WHERE table_to_xml('jobs', true, true, '') IS NOT NULL",
    "notify": "SELECT 1 AS id WHERE pg_notify('quarry_wakeup', '') IS NULL",
    "shared advisory lock": "SELECT id FROM styles WHERE pg_try_advisory_lock_shared(1)",
    "the dispatcher's lock row": "SELECT 1 AS id FROM quarry_locks",
    "a sequence moved": "SELECT nextval('shards_id_seq')::int AS id",
}
SIGNALS = {  # the sentinels' pids are only known at run time
    "terminate another session": "SELECT pg_terminate_backend({pid})::int AS id",
    "cancel another session": "SELECT pg_cancel_backend({pid})::int AS id",
    "terminate another selection": "SELECT pg_terminate_backend({reader})::int AS id",
    "cancel another selection": "SELECT pg_cancel_backend({reader})::int AS id",
    "terminate through query_to_xml": "SELECT 1 AS id"
    " WHERE query_to_xml('SELECT pg_terminate_backend({reader})', true, true, '') IS NOT NULL",
}


@pytest.mark.parametrize("query", [*ESCAPES.values(), *SIGNALS.values()], ids=[*ESCAPES, *SIGNALS])
def test_every_way_out_is_refused_with_one_line(
    guarded: psycopg.Connection, ingested: dict[str, str], db: psycopg.Connection, query: str
) -> None:
    if "{pid}" in query or "{reader}" in query:
        query = query.format(pid=sentinel_pid(db), reader=sentinel_pid(db, READER_SENTINEL))
    result = run_cli("run", "--query", query, env=ingested, check=False)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    quarry = Quarry.from_env()
    with pytest.raises(QuarryError):
        quarry.run(query)
    with pytest.raises(QuarryError):
        quarry.sql(query)


def test_refusals_name_the_reason(guarded: psycopg.Connection, ingested: dict[str, str]) -> None:
    expected = {
        "SELECT id FROM styles; DROP TABLE canary": "not a single SELECT: the text holds 2 statements",
        "WITH g AS (DELETE FROM canary RETURNING id) SELECT id FROM g": "the query writes (DELETE)",
        "SELECT id INTO stolen FROM styles": "the query writes (SELECT INTO)",
        "SELECT length(pg_read_file('/etc/passwd'))::int AS id": "calls pg_read_file(), which is not allowed",
        "SELECT 1 AS id FROM query_to_xml('SELECT 1', true, true, '') x": "calls query_to_xml(), which",
        "SELECT 1 AS id WHERE public.nothing_here() = 1": "query failed: function public.nothing_here()",
        "SELECT 1 AS id FROM jobs": "permission denied for table jobs",
        "SELECT id FROM styles WHERE set_config('work_mem', '1GB', false) > ''": "calls set_config(), which",
    }
    for query, reason in expected.items():
        result = run_cli("run", "--query", query, env=ingested, check=False)
        assert reason in result.stderr, (query, result.stderr)


def test_the_server_refuses_the_guarded_built_ins_to_every_role_but_the_owner(
    ingested: dict[str, str], db: psycopg.Connection, settings: Settings
) -> None:
    """The second wall: `producer init` (a superuser's URL here) took EXECUTE on the built-ins that
    run SQL text, change a session or signal one from PUBLIC; the query role, the pools and the
    dispatcher lack it, the owner keeps it; and none of them may lock quarry_locks' rows."""
    run_cli("init", env=ingested)
    functions = [
        row[0]
        for row in db.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace"
            " AND (proname = ANY(%s) OR proname LIKE 'pg\\_%%advisory\\_%%')",
            (list(GUARDED_BUILTINS),),
        )
    ]
    assert len(functions) >= len(GUARDED_BUILTINS) + 10, functions  # the advisory-lock family too
    roles = [settings.query_role, settings.worker_role, settings.dispatcher_role, settings.scaler_role]
    for role in roles:
        held = [
            function
            for function in functions
            if db.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, function)).fetchone()
            != (False,)
        ]
        assert held == [], (role, held)
        assert db.execute("SELECT has_table_privilege(%s, 'quarry_locks', 'UPDATE')", (role,)).fetchone() == (
            role == settings.dispatcher_role,
        )
    owner = db.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
    owner_name = owner.fetchone()[0]  # type: ignore[index]
    for function in functions:
        assert db.execute(
            "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (owner_name, function)
        ).fetchone() == (True,)
    reader_url = settings.query_database_url
    with psycopg.connect(reader_url, autocommit=True) as reader:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("SELECT pg_advisory_lock(1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("SELECT query_to_xml('SELECT 1', true, true, '')")


def test_the_row_limit_of_quarry_sql_is_the_servers(ingested: dict[str, str], db: psycopg.Connection) -> None:
    """`Quarry.sql(limit=…)` reads no more rows than asked: a query that fails on its 10th row
    returns 9 rows."""
    rows = Quarry.from_env().sql(
        "SELECT id, 1 / (10 - row_number() OVER (ORDER BY id))::int AS boom FROM styles", limit=9
    )
    assert len(rows) == 9


@pytest.fixture
def earlier_job(db: psycopg.Connection) -> Iterator[str]:
    """A finished job with predictions for the first five catalogued ids (ledger calls, no pools)."""
    job_id = str(uuid.uuid4())
    ids = [row[0] for row in db.execute("SELECT id FROM styles ORDER BY id LIMIT 5")]
    record_job(db, job_id, "SELECT id FROM styles", {}, [(0, ids, len(ids))])
    upsert_items(
        db, job_id, [ItemResult(i, 0, n, "done", label="Tshirts", score=0.9) for n, i in enumerate(ids)]
    )
    yield job_id
    db.execute("DELETE FROM jobs WHERE id = %s", (job_id,))


HONEST = {
    "ILIKE with %": "SELECT id FROM styles WHERE product_display_name ILIKE '%shoe%'",
    "LIKE with % and _": "SELECT id FROM styles WHERE article_type LIKE 'T_hirt%'",
    "the % operator": "SELECT id FROM styles WHERE id % 10 = 3",
    "dollar quoting": "SELECT id FROM styles WHERE gender = $$Men$$",
    "escaped strings": "SELECT id FROM styles WHERE gender <> E'Wo\\'men' AND usage <> 'it''s'",
    "join": "SELECT s.id FROM styles s JOIN images i USING (id) WHERE i.status = 'stored'",
    "CTE": "WITH shoes AS (SELECT id FROM styles WHERE master_category = 'Footwear') SELECT id FROM shoes",
    "a sample with random()": "SELECT id FROM styles WHERE random() < 0.5 OR id > 0",
    "rich: CTE, window, join, ILIKE, random()": "WITH t AS (SELECT s.id, row_number() OVER"
    " (PARTITION BY s.article_type ORDER BY random()) AS n FROM styles s JOIN images i USING (id)"
    " WHERE s.product_display_name ILIKE '%a%') SELECT id FROM t WHERE n <= 1000000",
    "window function": "SELECT id FROM (SELECT id,"
    " row_number() OVER (PARTITION BY article_type ORDER BY id) AS n FROM styles) r WHERE n <= 2",
    "LATERAL": "SELECT s.id FROM (SELECT DISTINCT article_type FROM styles) t,"
    " LATERAL (SELECT id FROM styles WHERE article_type = t.article_type ORDER BY id LIMIT 1) s",
    "VALUES": "SELECT id FROM (VALUES (1), (2), (3)) AS v (id)",
    "a trailing semicolon and comment": "SELECT id FROM styles WHERE year >= 2012; -- recent",
    "non-ASCII text, comments around": "-- café ☕\nSELECT id FROM styles"
    " WHERE product_display_name <> 'Café ☕'; -- é",
    "predictions of an earlier job": "SELECT p.image_id AS id FROM predictions p"
    " JOIN styles s ON s.id = p.image_id WHERE p.job_id = '{job}' AND p.label = 'Tshirts'",
}


@pytest.mark.parametrize("query", HONEST.values(), ids=HONEST.keys())
def test_honest_queries_work_through_the_cli_and_the_api(
    ingested: dict[str, str], db: psycopg.Connection, earlier_job: str, query: str
) -> None:
    query = query.replace("{job}", earlier_job)
    expected = db.execute(f"SELECT count(DISTINCT id) FROM ({query.split(';')[0]}) q").fetchone()[0]  # type: ignore[index]
    assert expected > 0
    quarry = Quarry.from_env()
    assert len(quarry.sql(query)) >= expected
    job = quarry.run(query)
    job.recorded()
    cancel_job(db, job.id)  # recorded is enough: the pools need not render it
    assert job.status().total == expected
    result = run_cli("run", "--query", query, env=ingested, check=False)
    assert result.returncode == 0, result.stderr
    cli_job = result.stdout.split()[-1]
    cancel_job(db, cli_job)
    assert db.execute("SELECT total FROM jobs WHERE id = %s", (cli_job,)).fetchone() == (expected,)


def test_a_selection_runs_as_the_query_role(ingested: dict[str, str], db: psycopg.Connection) -> None:
    catalogued = db.execute("SELECT count(*) FROM styles").fetchone()[0]  # type: ignore[index]
    quarry = Quarry.from_env()
    for user, expected in (("quarry_reader", catalogued), ("postgres", 0)):
        job = quarry.run(f"SELECT id FROM styles WHERE current_user = '{user}'")
        job.recorded()
        cancel_job(db, job.id)
        assert job.status().total == expected, user


def test_pools_and_dispatcher_do_not_connect_as_the_query_role(workers, ingested, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    # a job through every pool first (a model: the inference pool too): a pool connects on its
    # first chunk, not at start
    job_id = workers.submit("SELECT id FROM styles ORDER BY id LIMIT 3", "--model", "default")
    assert workers.wait_ended(job_id).done == 3

    def connected_users() -> set[str]:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            return {
                row[0]
                for row in conn.execute(
                    "SELECT usename FROM pg_stat_activity WHERE datname = current_database()"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
            }

    services = {settings.worker_role, settings.dispatcher_role}
    wait_until(lambda: services <= connected_users(), 60, f"sessions of {sorted(services)}")
    assert settings.query_role not in connected_users()
    assert psycopg.conninfo.conninfo_to_dict(settings.database_url).get("user") != settings.query_role
