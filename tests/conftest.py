"""Real services for the tests: a fresh PostgreSQL database, a Redis db, moto's S3 server on
loopback, and (for end-to-end tests) real Celery worker processes for all three pools."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from common.config import Settings, get_settings
from common.db import connect, ensure_database, ensure_schema
from common.query_role import ensure_query_role
from common.storage import ObjectStore
from tests.stack import Stack, free_port, wait_until

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
BIN = Path(sys.executable).parent
TEST_REDIS_DB = 13


@pytest.fixture(scope="session")
def s3_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """moto's S3 server, a real HTTP endpoint on loopback (the process, for tests that freeze it)."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_until(answers, 20, "moto_server")
    yield url, process
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: tuple[str, subprocess.Popen[bytes]]) -> str:
    return s3_server[0]


@pytest.fixture(scope="session")
def test_env(s3_endpoint: str) -> Iterator[dict[str, str]]:
    """Environment for this test session; the database is created here and dropped after."""
    name = f"quarry_test_{uuid.uuid4().hex[:8]}"
    env = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{name}",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        "S3_ENDPOINT_URL": s3_endpoint,
        "RAW_BUCKET": f"raw-{name.replace('_', '-')}",
        "OUTPUT_BUCKET": f"out-{name.replace('_', '-')}",
        "DATASET_PATH": str(SAMPLE),
        "MODEL_CACHE_DIR": f"/tmp/{name}-models",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    get_settings.cache_clear()
    ensure_database(env["DATABASE_URL"])
    redis.Redis.from_url(env["CELERY_BROKER_URL"]).flushdb()
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()
    redis.Redis.from_url(env["CELERY_BROKER_URL"]).flushdb()
    with connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    shutil.rmtree(env["MODEL_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def settings(test_env: dict[str, str]) -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def store(settings: Settings) -> ObjectStore:
    store = ObjectStore(settings)
    store.ensure_bucket(settings.raw_bucket)
    store.ensure_bucket(settings.output_bucket)
    return store


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection]:
    """An autocommit connection to a database with the schema and no job records."""
    with connect(settings.database_url, autocommit=True) as conn:
        ensure_schema(conn)
        ensure_query_role(conn, settings)
        yield conn
        conn.execute("TRUNCATE jobs, job_chunks, job_items")


@pytest.fixture(scope="session")
def workers(
    test_env: dict[str, str], store: ObjectStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The three pools and a dispatcher as real processes, on the session's Redis db."""
    stack = Stack(test_env, tmp_path_factory.mktemp("stack"))
    stack.start_pools()
    stack.start_dispatcher()
    yield stack
    stack.stop_all()


@pytest.fixture
def ingested(test_env: dict[str, str], store: ObjectStore) -> dict[str, str]:
    """The vendored sample, ingested through the real CLI (a re-run only checks what is stored)."""
    run_cli("ingest", env=test_env)
    return test_env


def run_cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `producer` CLI as a user would."""
    result = subprocess.run(
        [str(BIN / "producer"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"producer {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result
