"""Real services for the tests: a fresh PostgreSQL database, a Redis db, a real S3 server on
loopback (the JuiceFS gateway behind a counting proxy), and (for end-to-end tests) real Celery
worker processes for all three pools."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

import common.opencv  # noqa: F401  (first: OpenCV loads with IMAGE_MAX_PIXELS as its own limit)
from common.config import Settings, get_settings
from common.datasets import lookup_locations
from common.db import connect, ensure_database, ensure_schema
from common.roles import ensure_roles
from common.storage import ObjectStore
from tests.postgres import pg_url
from tests.stack import RequestLog, S3Server, Stack, start_s3

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
BIN = Path(sys.executable).parent
IMG2DATASET = Path(__file__).resolve().parent.parent / ".venv-tools" / "bin" / "img2dataset"  # `make test`
WITH_IMAGES = (
    "SELECT s.id FROM styles s JOIN images i USING (id) WHERE i.status = 'stored'"  # the sample's 295
)
# `make test` runs the suite in pytest-xdist worker processes (gw0, gw1, ...), each with servers
# and databases of its own; worker n takes Redis db QUARRY_TEST_REDIS_DB + n
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
BASE_REDIS_DB = int(os.environ.get("QUARRY_TEST_REDIS_DB", "13"))
TEST_REDIS_DB = BASE_REDIS_DB + XDIST_WORKER
REDIS_DBS = 16  # a Redis server's default `databases`

# What a test needs, told by the fixtures it uses or where it lives (docs/testing.md): `make
# test-fast` runs every test marked with none of these, with no server running.
SERVER_FIXTURES = {"test_env", "postgres_server"}  # every server fixture depends on one of them
WORKER_FIXTURES = {"workers"}
WORKER_MODULES = {"tests/workers", "tests/deploy/test_local_stack.py", "tests/deploy/test_guards.py"}
FAULT_MODULES = {
    "tests/workers/test_faults.py",
    "tests/workers/test_healing.py",
    "tests/workers/test_races.py",
    "tests/workers/test_nodes.py",
}
ROOT = Path(__file__).resolve().parent.parent


def lives_in(item: pytest.Item, places: set[str]) -> bool:
    where = item.path.relative_to(ROOT).as_posix()
    return any(where == place or where.startswith(place + "/") for place in places)


def pytest_configure(config: pytest.Config) -> None:
    """Refuse in one line a run whose last xdist worker would take a Redis db past the last."""
    if hasattr(config, "workerinput"):
        return  # a worker: the controller checked
    last = BASE_REDIS_DB + int(getattr(config.option, "numprocesses", None) or 1) - 1
    if last >= REDIS_DBS:
        raise pytest.UsageError(
            f"the test workers would use Redis dbs {BASE_REDIS_DB} to {last}, past the last"
            f" ({REDIS_DBS - 1}): fewer workers (make test TEST_WORKERS=...) or a lower QUARRY_TEST_REDIS_DB"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with what it needs: `server` (PostgreSQL, Redis or S3), `workers` (real
    pool or dispatcher processes), `faults` (it kills or freezes one of them)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        workers = bool(fixtures & WORKER_FIXTURES) or lives_in(item, WORKER_MODULES)
        if workers or fixtures & SERVER_FIXTURES or item.get_closest_marker("server"):
            item.add_marker(pytest.mark.server)
        if workers:
            item.add_marker(pytest.mark.workers)
        if lives_in(item, FAULT_MODULES):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The tests' PostgreSQL server (tests/postgres.py), for a test that makes a database of its own."""
    return pg_url("postgres")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server on loopback (the JuiceFS gateway, with keys) behind a counting proxy;
    `s3_server.process` for tests that freeze it, `s3_requests` for what a test asked of it."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_requests(s3_server: S3Server) -> RequestLog:
    """The S3 server's request log, marked now: what this test made the server do."""
    log = s3_server.requests()
    log.mark()
    return log


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: S3Server) -> str:
    return s3_server.endpoint


@pytest.fixture(scope="session")
def test_env(s3_server: S3Server) -> Iterator[dict[str, str]]:
    """Environment for this test session; the database is created here and dropped after."""
    name = f"quarry_test_{uuid.uuid4().hex[:8]}"
    env = {
        "DATABASE_URL": pg_url(name),
        "CELERY_BROKER_URL": f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        **s3_server.env(),
        "QUARRY_ENV_FILE": "",  # no .env of a developer's `make up` reaches the tests
        "RAW_BUCKET": f"raw-{name.replace('_', '-')}",
        "OUTPUT_BUCKET": f"out-{name.replace('_', '-')}",
        "DATASET_PATH": str(SAMPLE),
        "MODEL_CACHE_DIR": f"/tmp/{name}-models",
        "DISPATCH_METRICS_PORT": "0",  # tests start many dispatchers; test_metrics.py gives one a port
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
    with connect(pg_url("postgres"), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    shutil.rmtree(env["MODEL_CACHE_DIR"], ignore_errors=True)


PrivateDatabase = Callable[..., contextlib.AbstractContextManager[dict[str, str]]]


@pytest.fixture(scope="session")
def private_database(test_env: dict[str, str]) -> Iterator[PrivateDatabase]:
    """`with private_database(prefix, contents, **env) as env:` a database of the caller's own
    (the session's dispatcher and pools never see its jobs), dropped with FORCE after; `env` is
    the session's with DATABASE_URL pointing at it and the given settings on top. `contents`:
    "sample" (a copy of a template database the vendored sample was ingested into once, by the
    real CLI), "schema" (Quarry's tables and roles, no dataset) or "bare". `url_of` names another
    server's databases (tests/postgres.py machine_url)."""
    templates: list[str] = []

    def template() -> str:
        if not templates:
            name = f"quarry_template_{uuid.uuid4().hex[:8]}"
            ensure_database(pg_url(name))
            run_cli("ingest", env={**test_env, "DATABASE_URL": pg_url(name)})
            templates.append(name)
        return templates[0]

    @contextlib.contextmanager
    def private(
        prefix: str, contents: str = "sample", url_of: Callable[[str], str] = pg_url, **settings: str
    ) -> Iterator[dict[str, str]]:
        name = f"quarry_{prefix}_{uuid.uuid4().hex[:8]}"
        env = {**test_env, **settings, "DATABASE_URL": url_of(name)}
        admin_url = url_of("postgres")
        with connect(admin_url, autocommit=True) as admin:
            if contents == "sample":
                admin.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(*map(sql.Identifier, (name, template())))
                )
            else:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            if contents == "schema":
                with connect(env["DATABASE_URL"], autocommit=True) as conn:
                    ensure_schema(conn)
                    ensure_roles(conn, Settings(database_url=env["DATABASE_URL"]))
            yield env
        finally:
            with connect(admin_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    yield private
    with connect(pg_url("postgres"), autocommit=True) as admin:
        for name in templates:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


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
        ensure_roles(conn, settings)
        yield conn
        conn.execute("TRUNCATE jobs, job_chunks, job_items, ingest_units, recorded_batches")


@pytest.fixture
def own_datasets(db: psycopg.Connection) -> Iterator[None]:
    """Datasets a test registers are dropped after it (tables, locations, their shards' rows), so
    that later tests find `styles` the only dataset, as a job without --dataset needs. `styles`
    itself stays: a test may be the first of its session (or xdist worker) to ingest the sample
    (`ingested`), and the tests after it expect the sample there."""
    before = {row[0] for row in db.execute("SELECT name FROM datasets")} | {"styles"}
    yield
    for (name,) in db.execute("SELECT name FROM datasets").fetchall():
        if name not in before:
            db.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            db.execute("DELETE FROM datasets WHERE name = %s", (name,))
    db.execute("DELETE FROM shards s WHERE NOT EXISTS (SELECT FROM locations l WHERE l.shard = s.id)")


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


def boto3_client(settings: Settings) -> Any:
    """A boto3 S3 client on the test server, as another tool would read what Quarry wrote."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        region_name=settings.aws_default_region,
    )


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


def run_job(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    """`producer run ARGS --wait --json` followed to the job's end: (its exit status, 0 or 1 for
    failed items, and the job's summary)."""
    result = run_cli("run", *args, "--wait", "--json", "--wait-timeout", "180", env=env, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def raw_image(db: psycopg.Connection, store: ObjectStore, image_id: int, dataset: str = "styles") -> bytes:
    """An ingested image's bytes, read where its location says (a shard's byte range)."""
    location = lookup_locations(db, dataset, [image_id])[image_id]
    assert location.source is not None, location.error
    return store.read(location.source)[0]


def relocate(db: psycopg.Connection, image_id: int, uri: str, dataset: str = "styles") -> Callable[[], None]:
    """Point an image's location at an object of its own (not pinned); returns the undo."""
    before = db.execute(
        "SELECT l.* FROM locations l JOIN datasets d ON d.id = l.dataset WHERE d.name = %s AND l.id = %s",
        (dataset, image_id),
    ).fetchone()
    db.execute(
        "UPDATE locations l SET shard = NULL, byte_offset = NULL, byte_length = NULL, uri = %s, etag = NULL"
        " FROM datasets d WHERE d.id = l.dataset AND d.name = %s AND l.id = %s",
        (uri, dataset, image_id),
    )

    def undo() -> None:
        assert before is not None
        db.execute("DELETE FROM locations WHERE dataset = %s AND id = %s", (before[0], before[1]))
        db.execute(f"INSERT INTO locations VALUES ({', '.join(['%s'] * len(before))})", before)

    return undo


@pytest.fixture(scope="session")
def img2dataset_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WebDataset shards written by img2dataset itself, fetching sample images from a loopback
    HTTP server: 25 images and one URL that is not there, 10 samples per shard; each row has a
    caption, a score and an integer `sku` of its own (5000 + its line)."""
    if not IMG2DATASET.exists():
        pytest.fail(f"{IMG2DATASET} is missing: `make test` installs it")
    root = tmp_path_factory.mktemp("img2dataset")
    www = root / "www"
    www.mkdir()
    for path in sorted(SAMPLE.glob("images/*.jpg"))[:25]:
        (www / path.name).write_bytes(path.read_bytes())
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    lines = ["url,caption,score,sku"]
    lines += [
        f"http://127.0.0.1:{port}/{p.name},caption of {p.stem},{i / 25:.3f},{5000 + i}"
        for i, p in enumerate(sorted(www.iterdir()))
    ]
    lines.append(f"http://127.0.0.1:{port}/not-there.jpg,missing,0.5,5025")
    (root / "urls.csv").write_text("\n".join(lines) + "\n")
    try:
        subprocess.run(
            [
                str(IMG2DATASET),
                "--url_list",
                str(root / "urls.csv"),
                "--input_format",
                "csv",
                "--url_col",
                "url",
                "--caption_col",
                "caption",
                "--save_additional_columns",
                '["score", "sku"]',
                "--output_format",
                "webdataset",
                "--output_folder",
                str(root / "out"),
                "--processes_count",
                "1",
                "--thread_count",
                "4",
                "--resize_mode",
                "no",
                "--number_sample_per_shard",
                "10",
                "--enable_wandb",
                "False",
            ],
            check=True,
            capture_output=True,
            timeout=300,
            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
        )
    finally:
        server.shutdown()
        server.server_close()
    return root / "out"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def upload_folder(store: ObjectStore, folder: Path, bucket: str, prefix: str) -> None:
    store.ensure_bucket(bucket)
    for path in sorted(folder.iterdir()):
        store.put(
            bucket,
            f"{prefix}/{path.name}",
            path.read_bytes(),
            content_type="application/octet-stream",
            metadata={},
        )
