"""Running the user's selection query safely: read-only, time-limited, streamed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import psycopg
import psycopg.sql
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


SORT_MEMORY = "64MB"  # work_mem of the selection's sort: 1,000,000 ids sort in memory
CHUNKS = """
COPY (
    SELECT %(job_id)s::uuid, ((n - 1) / %(size)s)::integer, array_agg(id ORDER BY n),
           (count(*) * %(variants)s)::integer
    FROM (SELECT id, row_number() OVER () AS n FROM (
        SELECT DISTINCT q.id::bigint AS id FROM ({body}
        ) AS q WHERE q.id IS NOT NULL ORDER BY 1) AS d) AS r
    GROUP BY 2 ORDER BY 2
) TO STDOUT (FORMAT binary)
"""


@contextmanager
def stream_chunks(
    database_url: str, sql: str, timeout_s: int, *, job_id: str, chunk_size: int, variants: int
) -> Iterator[Iterator[bytes]]:
    """Yield the selection as job_chunks rows in PostgreSQL's binary COPY format: the distinct
    ids, sorted, `chunk_size` to a row. The server does the chunking; the bytes stream through.

    The query runs in a READ ONLY transaction with a statement timeout; it is checked (and its
    first block read) before this yields, so a refused query raises QueryError before anything
    is recorded.
    """
    body = check_query(sql)
    with connect(database_url) as conn, ExitStack() as stack:
        conn.read_only = True
        stack.enter_context(conn.transaction())
        cursor = stack.enter_context(conn.cursor())
        try:
            conn.execute(f"SET LOCAL statement_timeout = {int(timeout_s) * 1000}")
            conn.execute(f"SET LOCAL work_mem = '{SORT_MEMORY}'")
            cursor.execute(f"SELECT q.id FROM ({body}\n) AS q LIMIT 0")
            check_id_type(cursor)
            params = {"job_id": job_id, "size": chunk_size, "variants": variants}
            copy = stack.enter_context(cursor.copy(psycopg.sql.SQL(CHUNKS.format(body=body)), params))
            first = bytes(copy.read())
        except psycopg.Error as exc:
            raise translate(exc, timeout_s) from exc
        yield blocks(first, copy, timeout_s)


def check_id_type(cursor: psycopg.Cursor) -> None:
    """Refuse an id column that is not an integer."""
    description = cursor.description
    if description and description[0].name != "id":
        raise QueryError("the query has no id column; select styles.id AS id")
    if description and description[0].type_code not in INTEGER_TYPE_OIDS:
        raise QueryError("the query's id column must be an integer (the styles.id of an image)")


def blocks(first: bytes, copy: psycopg.Copy, timeout_s: int) -> Iterator[bytes]:
    """The first block, then the rest of the COPY stream."""
    block = first
    while block:
        yield block
        try:
            block = bytes(copy.read())
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
