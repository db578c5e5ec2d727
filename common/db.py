"""PostgreSQL connections and the schema."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from importlib import resources
from typing import ParamSpec, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.sql

from common.errors import DatabaseUnavailable

SCHEMA_LOCK_ID = 0x51A7  # advisory lock serialising concurrent schema creation


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection; an unreachable server raises DatabaseUnavailable."""
    try:
        return psycopg.connect(url, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {first_line(exc)}") from exc


def ensure_schema(conn: psycopg.Connection) -> None:
    """Create Quarry's tables when missing; safe to run concurrently."""
    ddl = resources.files("common").joinpath("schema.sql").read_text()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_ID,))
        conn.execute(ddl)


P = ParamSpec("P")
R = TypeVar("R")


def retryable(function: Callable[P, R]) -> Callable[P, R]:
    """Translate a lost or refused connection into DatabaseUnavailable (tasks retry on it)."""

    @wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"PostgreSQL: {first_line(exc)}") from exc

    return wrapper


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
