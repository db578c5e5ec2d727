"""The PostgreSQL server the tests use: one with pgvector, since a job with the shipped model
records embeddings (docs/content.md). This machine's server when it offers the `vector`
extension, else the embedded one `make up` starts (tests/vector_server.py), started once per
test session on first use and stopped when the session's process exits."""

from __future__ import annotations

import atexit
import contextlib
from functools import cache
from urllib.parse import urlsplit

import psycopg

from tests.vector_server import MACHINE, vector_server


@cache
def base_url() -> str:
    """postgresql://postgres@host:port of the tests' server."""
    stack = contextlib.ExitStack()
    url = stack.enter_context(vector_server())
    atexit.register(stack.close)
    return url


def pg_url(database: str, user: str = "postgres") -> str:
    """A URL of one database of the tests' server, logged in as `user` (trust authentication)."""
    return base_url().replace("postgres@", f"{user}@", 1) + f"/{database}"


def pg_port() -> int:
    return urlsplit(base_url()).port or 5432


def machine_url(database: str) -> str:
    """A database of this machine's own server (which may lack pgvector)."""
    return f"{MACHINE}/{database}"


def deadlocks(conn: psycopg.Connection) -> int:
    """Deadlocks PostgreSQL counted in this connection's database, every backend's included. A
    backend reports its statistics when it exits, and otherwise only once a second at most: the
    database's other backends are ended first (Quarry's processes reconnect on their own), and
    the count is read once they are gone."""
    from tests.stack import wait_until

    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    conn.execute(f"SELECT pg_terminate_backend(pid) {others}")
    wait_until(lambda: conn.execute(f"SELECT count(*) {others}").fetchone() == (0,), 30, "backends to exit")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])
