"""Running user SQL: parsed by PostgreSQL's grammar, run as the query role, read-only, limited.

Every piece of user SQL (a job's selection, `Quarry.sql`) goes through `check_query` and then
`user_session`: one plain query statement, checked with libpg_query (pglast), sent inside a
READ ONLY transaction on a session that logged in as QUERY_ROLE, with the statement timeout,
work_mem and temp-file limit of user queries, over the extended query protocol (so no text can
add a statement). What the role may not do, the server refuses; docs/decisions.md ("User SQL").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from pglast import parser as pg_parser
from psycopg import errors as pg_errors
from psycopg import sql

from common.config import Settings
from common.db import connect, first_line
from common.errors import QueryError
from common.packed_ids import PackedIds
from common.query_role import check_query_session

INTEGER_TYPE_OIDS = frozenset({20, 21, 23})  # int8, int2, int4
# keys of libpg_query's parse tree that mark a statement that writes or locks
WRITES = {
    "InsertStmt": "the query writes (INSERT)",
    "UpdateStmt": "the query writes (UPDATE)",
    "DeleteStmt": "the query writes (DELETE)",
    "MergeStmt": "the query writes (MERGE)",
    "intoClause": "the query writes (SELECT INTO)",
    "lockingClause": "the query locks rows (FOR UPDATE/SHARE)",
}
# The functions user SQL may call: those PostgreSQL's catalog marks immutable or stable (they read,
# and cannot change the database or a session: running SQL text, settings, locks, notifications
# and signals are all volatile), and these volatile ones of pg_catalog, which only draw numbers,
# read the clock or wait (docs/decisions.md, "User SQL").
VOLATILE_ALLOWED = frozenset(
    {
        "random",
        "gen_random_uuid",
        "clock_timestamp",
        "timeofday",
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
    }
)
# every function of these names, in every schema, with whether one of them may not be called
CALLABLE = """
SELECT p.proname, n.nspname, bool_and(p.prokind IN ('f', 'a', 'w') AND p.provolatile IN ('i', 's'))
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname = ANY(%s) GROUP BY 1, 2
"""


def check_query(text: str) -> str:
    """The one statement of `text` (comments and a final semicolon dropped from its ends);
    QueryError naming the reason unless it is a single plain query (SELECT, WITH … SELECT,
    VALUES, TABLE) that neither writes nor locks. What it calls is checked against the catalog
    on the query role's session (`check_calls`)."""
    try:
        tree = json.loads(pg_parser.parse_sql_json(text))
    except pg_parser.ParseError as exc:
        raise QueryError(f"query refused: {first_line(exc)}") from exc
    statements = tree.get("stmts", [])
    if not statements:
        raise QueryError("the query is empty")
    if len(statements) > 1:
        raise QueryError(f"not a single SELECT: the text holds {len(statements)} statements")
    (raw,) = statements
    kind = next(iter(raw["stmt"]))
    if kind != "SelectStmt":
        verb = kind.removesuffix("Stmt").upper()
        raise QueryError(
            f"not a single SELECT: this one is {verb} (only SELECT, WITH, VALUES, TABLE are allowed)"
        )
    for reason in refusals(raw["stmt"]):
        raise QueryError(reason)
    start = raw.get("stmt_location", 0)  # byte offsets into the UTF-8 text, as PostgreSQL's
    length = raw.get("stmt_len")
    encoded = text.encode()
    return encoded[start : start + length if length else None].decode().strip()


def refusals(node: Any) -> Iterator[str]:
    """Why a parsed statement is refused: every writing or locking part."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in WRITES and value:
                yield WRITES[key]
            yield from refusals(value)
    elif isinstance(node, list):
        for item in node:
            yield from refusals(item)


def called_functions(node: Any) -> Iterator[tuple[str | None, str]]:
    """(schema or None, name) of every function a parsed statement calls by name."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "FuncCall":
                names = [part["String"]["sval"] for part in value["funcname"]]
                yield (names[-2] if len(names) > 1 else None), names[-1]
            yield from called_functions(value)
    elif isinstance(node, list):
        for item in node:
            yield from called_functions(item)


def check_calls(conn: psycopg.Connection, body: str) -> None:
    """QueryError naming the first function `body` calls that user SQL may not: one that is not
    immutable or stable in PostgreSQL's catalog (in any schema holding that name), unless it is
    one of pg_catalog's VOLATILE_ALLOWED. A name no schema holds is left to the server."""
    calls = set(called_functions(json.loads(pg_parser.parse_sql_json(body))))
    if not calls:
        return
    rows = conn.execute(CALLABLE, (sorted({name for _, name in calls}),)).fetchall()
    for name, schema, reads_only in rows:
        called = (None, name) in calls or (schema, name) in calls
        allowed = name in VOLATILE_ALLOWED and schema == "pg_catalog"
        if called and not reads_only and not allowed:
            raise QueryError(
                f"the query calls {name}(), which is not allowed: user SQL may call only functions"
                " that read (immutable or stable ones) and random(), the clock and pg_sleep()"
            )


def embed(template: str, body: str) -> str:
    """`template` with the checked statement in place of {body}, on lines of its own (a line
    comment cannot swallow what follows), its `%` doubled for psycopg's placeholders."""
    return template.replace("{body}", "\n" + body.replace("%", "%%") + "\n")


@contextmanager
def user_session(settings: Settings, snapshot: str | None = None) -> Iterator[psycopg.Connection]:
    """A READ ONLY, REPEATABLE READ transaction on a session logged in as the query role, limits
    set, in the exported `snapshot` when one is given (every reader of one selection sees the
    same catalog); QueryError for what the server refuses inside it."""
    with connect(settings.query_database_url, autocommit=True) as conn:
        check_query_session(conn, settings.query_role)
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction(force_rollback=True):  # whatever it did, nothing of it is kept
            if snapshot is not None:  # must be the transaction's first statement
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            conn.execute(
                sql.SQL("SET LOCAL statement_timeout = {}; SET LOCAL work_mem = {}").format(
                    sql.Literal(f"{settings.query_timeout_s}s"), sql.Literal(settings.query_work_mem)
                )
            )
            conn.execute(VECTOR_SEARCH)
            try:
                yield conn
            except psycopg.Error as exc:
                raise translate(exc, settings.query_timeout_s) from exc


# a similarity search with a WHERE returns its whole LIMIT: pgvector's HNSW scan goes on past
# ef_search candidates until enough rows pass the filter, in exact distance order; 100 candidates
# (pgvector's default is 40) for recall@10 1.000 at the same latency (bench.similarity, docs/content.md)
VECTOR_SEARCH = "SET LOCAL hnsw.iterative_scan = strict_order; SET LOCAL hnsw.ef_search = 100"
PROBE = "SELECT q.id FROM ({body}) AS q LIMIT %(none)s"
# A bounded slice: its distinct ids as one sorted bigint[] (read as PackedIds, cut into chunks by
# the recorder). The range is on the query's own output, so it holds whatever the query is; the
# planner moves it down to the dataset's id index where that keeps the result the same.
SLICE_IDS = """
SELECT array_agg(id ORDER BY id) FROM (
    SELECT DISTINCT q.id::bigint AS id FROM ({body}) AS q
    WHERE q.id >= %(low)s AND q.id < %(high)s) AS d
"""
# A streamed slice (a query kept whole, or the ids outside the dataset's range): the distinct ids,
# sorted (which is storage order: folders are packed in id order, a shard's members get ids in
# offset order), numbered and cut into chunks by the server, fetched CHUNKS_PER_FETCH at a time.
CHUNK_ROWS = """
SELECT %(first)s + ((n - 1) / %(size)s)::integer, array_agg(id ORDER BY n), count(*)::integer
FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM (
    SELECT DISTINCT q.id::bigint AS id FROM ({body}) AS q WHERE q.id IS NOT NULL AND {where}) AS d) AS r
GROUP BY 1 ORDER BY 1
"""
EVERY_ID = "true"
OUTSIDE = "(q.id < %(low)s OR q.id >= %(high)s)"
CHUNKS_PER_FETCH = 100
USER_ROWS = "SELECT * FROM ({body}) AS q LIMIT %(limit)s"  # LIMIT NULL: every row


def check_selection(conn: psycopg.Connection, body: str) -> None:
    """Plan and type the query without reading a row: QueryError for a missing table or column,
    a privilege the query role lacks, or an id column that is not an integer."""
    check_calls(conn, body)
    probe = conn.execute(embed(PROBE, body), {"none": 0}, prepare=True)
    check_id_type(probe)


def read_slice(conn: psycopg.Connection, body: str, low: int, high: int) -> PackedIds:
    """The distinct ids of the selection in [low, high), sorted."""
    row = conn.execute(embed(SLICE_IDS, body), {"low": low, "high": high}, binary=True).fetchone()
    return row[0] if row and row[0] is not None else PackedIds(memoryview(b""))


def stream_slice(
    conn: psycopg.Connection, body: str, where: str, params: dict[str, Any], timeout_s: int
) -> Iterator[list[tuple[int, PackedIds, int]]]:
    """Batches of (chunk index, ids, id count) rows of a streamed slice, in chunk order."""
    with conn.cursor(name="quarry_selection", binary=True) as cursor:
        statement = embed(CHUNK_ROWS.replace("{where}", where), body)
        try:
            cursor.execute(statement, params)
            while batch := cursor.fetchmany(CHUNKS_PER_FETCH):
                yield batch
        except psycopg.Error as exc:
            raise translate(exc, timeout_s) from exc


def run_user_query(
    settings: Settings, sql: str, limit: int | None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(column names, at most `limit` rows) of a checked query, run as the query role."""
    body = check_query(sql)
    with user_session(settings) as conn:
        check_calls(conn, body)
        # prepare=True: the extended protocol also when there is no parameter to bind; the limit
        # is the server's, so no more rows than it are read
        cursor = conn.execute(embed(USER_ROWS, body), {"limit": limit}, prepare=True)
        found = cursor.fetchall()
        return [column.name for column in cursor.description or []], found


def check_id_type(cursor: psycopg.Cursor) -> None:
    """Refuse an id column that is not an integer."""
    description = cursor.description
    if description and description[0].type_code not in INTEGER_TYPE_OIDS:
        raise QueryError(
            "the query's id column must be an integer (the image ids of a dataset, e.g. styles.id)"
        )


def translate(exc: psycopg.Error, timeout_s: int) -> QueryError:
    """A one-line QueryError for what the server refused."""
    message = exc.diag.message_primary or first_line(exc)
    if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
        return QueryError(f"the query writes: {message}")
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return QueryError(f"query refused: {message}")
    if isinstance(exc, pg_errors.UndefinedColumn) and "q.id" in message:
        return QueryError("the query has no id column; select the dataset's ids AS id (e.g. styles.id AS id)")
    if isinstance(exc, pg_errors.QueryCanceled):
        return QueryError(f"query exceeded the statement timeout of {timeout_s} s")
    return QueryError(f"query failed: {message}")
