"""Least privilege, in a database whose owner is not a superuser (as Compose makes it): during a
whole job (ingest, selection, transform, upload, inference, dispatch) no session of Quarry's
processes is a superuser, and the pools and the dispatcher cannot touch the tables their work
does not need."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors

from common.config import Settings, login_url
from tests.conftest import SAMPLE, run_cli
from tests.postgres import pg_url
from tests.stack import Stack, wait_until

SESSIONS = """
SELECT a.usename, r.rolsuper FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename
WHERE a.datname = %s AND a.backend_type = 'client backend'
"""


@pytest.fixture(scope="module")
def owned(test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A database owned by a role with CREATEROLE and no more, with pgvector created by a superuser
    (as docs/content.md tells an administrator), initialised by that owner, with a broker, the
    three pools and a dispatcher of its own."""
    suffix = uuid.uuid4().hex[:8]
    owner, database = f"quarry_owner_{suffix}", f"quarry_lp_{suffix}"
    with psycopg.connect(pg_url("postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {owner} LOGIN NOSUPERUSER NOCREATEDB CREATEROLE")
        admin.execute(f"CREATE DATABASE {database} OWNER {owner}")
    with psycopg.connect(pg_url(database), autocommit=True) as admin:  # as an administrator would
        admin.execute("CREATE EXTENSION vector")  # (only a superuser may create it: not trusted)
    env = {
        **test_env,
        "DATABASE_URL": pg_url(database, user=owner),
        "RAW_BUCKET": f"raw-lp-{suffix}",
        "OUTPUT_BUCKET": f"out-lp-{suffix}",
    }
    stack = Stack(env, tmp_path_factory.mktemp("least-privilege"))
    try:
        run_cli("init", env=env)
        stack.start_own()
        yield stack
    finally:
        stack.stop_all()
        with psycopg.connect(pg_url("postgres"), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {owner}")


def test_no_session_of_a_job_is_a_superuser(owned: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((SAMPLE / "images").glob("*.jpg"))[:24]:
        shutil.copy(path, folder / path.name)
    run_cli("ingest", str(folder), "--dataset", "photos", env=owned.env)
    database = psycopg.conninfo.conninfo_to_dict(owned.env["DATABASE_URL"])["dbname"]
    seen: set[tuple[str, bool]] = set()
    with psycopg.connect(pg_url("postgres"), autocommit=True) as admin:
        job_id = owned.submit(
            "SELECT id FROM photos", "--model", "default", "--augment", "resize(64, 64)", "--chunk-size", "4"
        )

        def ended() -> bool:
            seen.update(admin.execute(SESSIONS, (database,)).fetchall())
            return owned.progress(job_id).ended

        wait_until(ended, 300, "the job", interval=0.1)
    final = owned.progress(job_id)
    assert (final.state, final.done, final.failed) == ("finished", 24, 0)
    settings = Settings(database_url=owned.env["DATABASE_URL"])
    users = {user for user, _ in seen}
    assert {settings.worker_role, settings.dispatcher_role} <= users, seen  # the job was watched
    assert [user for user, superuser in seen if superuser] == []


WORKER_REFUSED = (
    "INSERT INTO jobs (id, query, spec) VALUES (gen_random_uuid(), 'x', '{}')",
    "DELETE FROM jobs",
    "SELECT * FROM dispatchers",
    "UPDATE schema_version SET version = 0",
    "SELECT * FROM quarry_locks FOR UPDATE",
    "DELETE FROM datasets",
    "TRUNCATE job_items",
    "CREATE TABLE stolen (id int)",
    "DROP TABLE photos",
    "DELETE FROM photos",
    "COPY (SELECT 1) TO '/tmp/quarry-stolen'",
)
DISPATCHER_REFUSED = (
    "SELECT * FROM photos",
    "UPDATE locations SET uri = 's3://elsewhere/x'",
    "INSERT INTO shards (uri, size, etag) VALUES ('s3://x/y', 1, 'e')",
    "DELETE FROM datasets",
    "CREATE TABLE stolen (id int)",
)


@pytest.mark.parametrize(
    ("role", "statement"),
    [("worker", s) for s in WORKER_REFUSED] + [("dispatcher", s) for s in DISPATCHER_REFUSED],
)
def test_the_pools_and_the_dispatcher_cannot_touch_what_they_do_not_need(
    owned: Stack, role: str, statement: str
) -> None:
    settings = Settings(database_url=owned.env["DATABASE_URL"])
    name = settings.worker_role if role == "worker" else settings.dispatcher_role
    with (
        psycopg.connect(login_url(settings.database_url, name, ""), autocommit=True) as conn,
        pytest.raises(pg_errors.InsufficientPrivilege),
    ):
        conn.execute(statement)
