"""Running the user's selection query safely: read-only, time-limited, streamed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors

from common.db import connect, first_line
from common.errors import QueryError

READ_KEYWORDS = frozenset({"select", "with", "values", "table", "("})
INTEGER_TYPE_OIDS = frozenset({20, 21, 23})  # int8, int2, int4
COMMENTS = re.compile(r"(--[^\n]*\n?|/\*.*?\*/)", re.DOTALL)


def check_query(sql: str) -> str:
    """The query without trailing semicolons; QueryError if it cannot be a read."""
    body = sql.strip().rstrip(";").strip()
    stripped = COMMENTS.sub(" ", body).strip()
    if not stripped:
        raise QueryError("the query is empty")
    first = stripped.split(None, 1)[0].lower()
    first = "(" if first.startswith("(") else first
    if first not in READ_KEYWORDS:
        raise QueryError(f"only SELECT queries are allowed; this one starts with {first.upper()}")
    return body


@contextmanager
def stream_ids(database_url: str, sql: str, timeout_s: int, batch: int) -> Iterator[Iterator[int]]:
    """Yield an iterator over the distinct `id`s the query selects.

    The query runs in a READ ONLY transaction with a statement timeout, through a server-side
    cursor; it is checked (and its first batch fetched) before this yields, so a refused query
    raises QueryError before anything is recorded or enqueued.
    """
    body = check_query(sql)
    wrapped = f"SELECT DISTINCT q.id FROM ({body}\n) AS q WHERE q.id IS NOT NULL"
    with connect(database_url) as conn:
        conn.read_only = True
        with conn.transaction(), conn.cursor(name="quarry_selection") as cursor:
            try:
                conn.execute(f"SET LOCAL statement_timeout = {int(timeout_s) * 1000}")
                cursor.execute(wrapped)
                first = cursor.fetchmany(batch)
            except psycopg.Error as exc:
                raise translate(exc, timeout_s) from exc
            check_id_type(cursor)
            yield iterate(first, cursor, batch, timeout_s)


def check_id_type(cursor: psycopg.Cursor) -> None:
    """Refuse an id column that is not an integer."""
    description = cursor.description
    if description and description[0].type_code not in INTEGER_TYPE_OIDS:
        raise QueryError("the query's id column must be an integer (the styles.id of an image)")


def iterate(first: list[tuple[int]], cursor: psycopg.Cursor, batch: int, timeout_s: int) -> Iterator[int]:
    """The first batch, then the rest of the cursor, one id at a time."""
    rows = first
    while rows:
        for (image_id,) in rows:
            yield image_id
        try:
            rows = cursor.fetchmany(batch)
        except psycopg.Error as exc:
            raise translate(exc, timeout_s) from exc


def translate(exc: psycopg.Error, timeout_s: int) -> QueryError:
    """A one-line QueryError for a failed query."""
    if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
        return QueryError(f"query refused: it would write ({first_line(exc)})")
    if isinstance(exc, pg_errors.UndefinedColumn) and "q.id" in (exc.diag.message_primary or ""):
        return QueryError("the query has no id column; select styles.id AS id")
    if isinstance(exc, pg_errors.QueryCanceled):
        return QueryError(f"query exceeded the statement timeout of {timeout_s} s")
    return QueryError(f"query failed: {exc.diag.message_primary or first_line(exc)}")
