"""PostgreSQL connections and the schema."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.sql
from psycopg import errors as pg_errors

from common.errors import ConfigError, DatabaseUnavailable, LockConflict

log = logging.getLogger(__name__)
R = TypeVar("R")
SCHEMA_LOCK_ID = 0x51A7  # advisory lock serialising concurrent schema creation
SCHEMA_VERSION = 7  # 2: the job ledger (chunk states, leases, counters); 3: datasets, locations;
# 4: selections recorded while they run (jobs.recorded_at, recorder_pid, slicing, error; state failed),
# holders and holds (liveness); 5: datasets.source; 6: quarry_locks (row locks instead of advisory);
# 7: model_outputs, jobs.inferred, job_chunks.inferred_mask, embedding_sets
MIN_POSTGRES = 14  # a floor chosen, not tested: 15 and 18 are the versions tested
CONNECTION_LOST = (psycopg.OperationalError, psycopg.InterfaceError)
# Two transactions that wanted each other's locks (one is rolled back), a serialization failure,
# or a lock not granted within LOCK_TIMEOUT: the same transaction run again succeeds.
LOCK_CONFLICTS = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, pg_errors.LockNotAvailable)
LOCK_TIMEOUT = "10s"  # no ledger statement waits longer for a row lock (then it is retried)
# A silent peer (the host gone, a partition dropping packets) ends the connection in about a
# minute instead of never: TCP keepalives after 30 s idle, 3 probes 10 s apart, and at most 60 s
# for sent data to be acknowledged. The server side gets the same on its end of the session.
KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms
    "connect_timeout": 10,
}
# the server's end of the session: the same keepalives, and no row lock waited on for long
# (SET, not set_config(): the hardened databases grant set_config() to their owner alone)
SESSION_SETTINGS = psycopg.sql.SQL(
    "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3;"
    " SET tcp_user_timeout = 60000; SET lock_timeout = {}"
).format(psycopg.sql.Literal(LOCK_TIMEOUT))


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection with TCP keepalives both ways and LOCK_TIMEOUT; an unreachable server
    raises DatabaseUnavailable. Connection parameters in the URL win over the keepalive defaults."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    options: dict[str, Any] = {key: value for key, value in KEEPALIVE.items() if key not in given}
    try:
        conn = psycopg.connect(url, autocommit=autocommit, **options)
        conn.execute(SESSION_SETTINGS)
        if not autocommit:
            conn.commit()
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {first_line(exc)}") from exc
    return conn


def postgres_too_old(server_version: int) -> str | None:
    """Why a server of libpq's `server_version` (e.g. 150020) is refused; None when it is not."""
    if server_version >= MIN_POSTGRES * 10_000:
        return None
    shown = f"{server_version // 10_000}.{server_version % 10_000}"
    return f"PostgreSQL {MIN_POSTGRES} or newer is needed; the server at DATABASE_URL is {shown}"


def check_server_version(conn: psycopg.Connection) -> None:
    """ConfigError, one line, for a PostgreSQL older than MIN_POSTGRES."""
    if refusal := postgres_too_old(conn.info.server_version):
        raise ConfigError(refusal)


def ensure_schema(conn: psycopg.Connection, raw_bucket: str = "quarry-raw") -> None:
    """Create Quarry's tables when missing (on a server new enough); safe to run concurrently.
    A schema-2 catalog (one `images` table of raw objects in `raw_bucket`) becomes locations of
    the dataset `styles`. A database already at SCHEMA_VERSION is left alone: running the DDL
    again would replace the views, a lock that waits for every running selection that reads
    them. LockConflict (one line) when another session keeps the schema locked."""
    check_server_version(conn)
    try:
        with conn.transaction():
            if schema_version(conn) == SCHEMA_VERSION:
                return
            create_or_migrate(conn, raw_bucket)
    except LOCK_CONFLICTS as exc:
        raise LockConflict(f"PostgreSQL: the schema is locked by another session: {first_line(exc)}") from exc


def schema_version(conn: psycopg.Connection) -> int | None:
    """The database's schema version, None when it has none."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    version = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return None if version is None else version[0]


def create_or_migrate(conn: psycopg.Connection, raw_bucket: str) -> None:
    """The DDL, under an advisory lock (concurrent producers), with the schema-2 migration."""
    ddl = resources.files("common").joinpath("schema.sql").read_text()
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_ID,))
    if schema_version(conn) == SCHEMA_VERSION:
        return  # another session made it while this one waited
    old = conn.execute(
        "SELECT to_regclass('jobs') IS NOT NULL AND to_regclass('schema_version') IS NULL"
    ).fetchone()
    if old and old[0]:
        raise ConfigError(
            "this database holds job tables from before the job ledger: drop tables job_items,"
            " job_chunks, jobs (job records only; the catalog stays) or use another DATABASE_URL"
        )
    images_table = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_class WHERE oid = to_regclass('images') AND relkind = 'r')"
    ).fetchone()
    if images_table and images_table[0]:
        conn.execute("ALTER TABLE images RENAME TO images_v2")
    conn.execute(ddl)
    if images_table and images_table[0]:
        migrate_images(conn, raw_bucket)
    conn.execute(
        "INSERT INTO schema_version SELECT %s WHERE NOT EXISTS (SELECT FROM schema_version)",
        (SCHEMA_VERSION,),
    )
    conn.execute("UPDATE schema_version SET version = %s WHERE version < %s", (SCHEMA_VERSION,) * 2)


def migrate_images(conn: psycopg.Connection, raw_bucket: str) -> None:
    """Schema 2 -> 3: each raw object of the fashion archive becomes a location of `styles`."""
    conn.execute(
        "INSERT INTO datasets (name, id_column, format) VALUES ('styles', 'id', 'kaggle')"
        " ON CONFLICT DO NOTHING"
    )
    conn.execute(
        """INSERT INTO locations (dataset, id, uri, byte_length, width, height, error)
           SELECT d.id, i.id, CASE WHEN i.status = 'stored' THEN %s || i.raw_key END, i.size_bytes,
                  i.width, i.height, CASE WHEN i.status = 'bad' THEN coalesce(i.error, 'bad image') END
           FROM images_v2 i, datasets d WHERE d.name = 'styles'
           ON CONFLICT DO NOTHING""",
        (f"s3://{raw_bucket}/",),
    )
    conn.execute("DROP TABLE images_v2")


class Database:
    """A long-running process's PostgreSQL access: one autocommit connection per thread, reopened
    when it broke, and `run` retries a whole (idempotent) call through connection loss."""

    def __init__(
        self, url: str, *, retry_for_s: float = 30.0, idle_in_transaction_s: int | None = None
    ) -> None:
        """`idle_in_transaction_s`: the server ends a session that leaves a transaction idle this
        long, releasing its locks (a client cut off mid-transaction cannot roll back itself)."""
        self.url = url
        self.retry_for_s = retry_for_s
        self.idle_in_transaction_s = idle_in_transaction_s
        self._local = threading.local()

    def connection(self) -> psycopg.Connection:
        """This thread's connection, opened anew if it is closed or broken."""
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = connect(self.url, autocommit=True)
            if self.idle_in_transaction_s:
                conn.execute(
                    psycopg.sql.SQL("SET idle_in_transaction_session_timeout = {}").format(
                        psycopg.sql.Literal(f"{self.idle_in_transaction_s}s")
                    )
                )
            self._local.conn = conn
        return conn

    def run(self, function: Callable[..., R], *args: object) -> R:
        """`function(conn, *args)`, run again after a lock conflict (deadlock, serialization
        failure, lock timeout: jittered backoff, same connection) and on a fresh connection while
        PostgreSQL is unreachable (AdminShutdown, a stale connection, a restart). After
        `retry_for_s`: LockConflict or DatabaseUnavailable, one line each. `function` must run its
        writes in one transaction (or be idempotent), so that running it again is safe."""
        deadline = time.monotonic() + self.retry_for_s
        tries = 0
        while True:
            tries += 1
            try:
                return function(self.connection(), *args)
            except LOCK_CONFLICTS as exc:
                delay = random.uniform(0, min(2.0, 0.05 * 2**tries))  # "full jitter" backoff
                if time.monotonic() + delay > deadline:
                    raise LockConflict(f"PostgreSQL: {first_line(exc)} ({tries} tries)") from exc
                log.info("PostgreSQL lock conflict (%s); retrying in %.2f s", first_line(exc), delay)
            except (*CONNECTION_LOST, DatabaseUnavailable) as exc:
                self.close()
                delay = min(0.2 * 2 ** (tries - 1), 5.0)
                if time.monotonic() + delay > deadline:
                    raise DatabaseUnavailable(f"PostgreSQL: {first_line(exc)}") from exc
                log.warning("PostgreSQL connection lost (%s); retrying in %.1f s", first_line(exc), delay)
            time.sleep(delay)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def wait_for_schema(url: str, interval_s: float = 2.0) -> None:
    """Return once the database at `url` holds the current schema and this login may read it;
    until then (no database, no role, no grants yet: `producer init` has not run) say why once
    and look again every `interval_s`. For the services, which never create the schema."""
    said = None
    while True:
        try:
            with connect(url, autocommit=True) as conn:
                version = schema_version(conn)
            if version == SCHEMA_VERSION:
                return
            reason = f"schema {version}, not {SCHEMA_VERSION}"
        except (DatabaseUnavailable, psycopg.Error) as exc:
            reason = first_line(exc)
        if reason != said:
            log.warning("waiting for `producer init` on this database: %s", reason)
            said = reason
        time.sleep(interval_s)


def take_lock(conn: psycopg.Connection, name: str, *, wait: bool = True) -> bool:
    """Lock the row `name` of quarry_locks for this transaction; without `wait`, False when
    another session holds it. (The query role cannot lock these rows: it lacks UPDATE on them.)"""
    skip = "" if wait else " SKIP LOCKED"
    row = conn.execute(f"SELECT name FROM quarry_locks WHERE name = %s FOR UPDATE{skip}", (name,)).fetchone()
    return row is not None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ensure_database(url: str) -> bool:
    """Create the URL's database when missing (connecting to `postgres`); True if created."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    name = info.get("dbname")
    if not name:
        return False
    admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    with connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(str(name))))
        return True
