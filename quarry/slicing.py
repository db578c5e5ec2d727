"""Cutting a selection into slices of the dataset's id range, recorded independently.

A slice is the same query with `q.id` bounded to a range, so the slices of a query that returns
the same rows every time it runs (in one snapshot) hold every selected id exactly once. Whether a
query may be sliced is read from its parse tree: what makes a result depend on the whole of it
(LIMIT/OFFSET, DISTINCT ON, GROUP BY/HAVING, aggregates, window functions) or differ between runs
(volatile functions, TABLESAMPLE, the clock) keeps it in one slice, and so does a query that
does not read the dataset's table. docs/decisions.md ("The selection").
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from pglast import parser as pg_parser

MAX_SLICES = 100_000  # a sparser id range is cut into wider slices, not into more
# parse-tree keys whose presence keeps a query whole, with the reason said
WHOLE_RESULT_KEYS = {
    "limitCount": "it has a LIMIT",
    "limitOffset": "it has an OFFSET",
    "groupClause": "it groups rows (GROUP BY)",
    "havingClause": "it groups rows (HAVING)",
    "RangeTableSample": "it samples a table (TABLESAMPLE)",
    "SQLValueFunction": "it reads the clock (CURRENT_TIMESTAMP and kin)",
}
# stable, but not the same in two transactions (each slice's reader has its own)
CLOCK_FUNCTIONS = frozenset({"now", "transaction_timestamp", "statement_timestamp"})


@dataclass(frozen=True)
class Slice:
    """Ids `low` <= id < `high` of the selection; `streamed`: the ids outside [low, high), or
    every id when both are None, read as chunk rows through a cursor (their number has no bound)."""

    number: int  # its place in id order: its chunks are numbered after those of slice number - 1
    low: int | None
    high: int | None
    streamed: bool = False


@dataclass(frozen=True)
class SlicePlan:
    slices: list[Slice]
    note: str  # one line for the job: how it was cut, or why it was not


def whole(reason: str) -> SlicePlan:
    return SlicePlan([Slice(0, None, None, streamed=True)], f"recorded as one slice: {reason}")


def plan_slices(bounds: tuple[int, int] | None, slice_ids: int, keep_whole: str | None) -> SlicePlan:
    """Slices of `slice_ids` ids over `bounds` (the dataset's smallest and largest id), then one
    for any id outside them. An id range too sparse for MAX_SLICES slices gets wider ones (a
    slice holds at most the dataset's rows in its range, however wide)."""
    if keep_whole:
        return whole(keep_whole)
    if bounds is None:
        return whole("the dataset has no rows yet")
    low, high = bounds
    width = max(slice_ids, math.ceil((high - low + 1) / MAX_SLICES))
    count = math.ceil((high - low + 1) / width)
    slices = [Slice(n, low + n * width, min(low + (n + 1) * width, high + 1)) for n in range(count)]
    outside = Slice(count, low, high + 1, streamed=True)
    return SlicePlan([*slices, outside], f"recorded in {count} slices of {width} ids")


def parse_tree(statement: str) -> dict[str, Any]:
    """The checked statement's parse tree (libpg_query, as JSON)."""
    tree: dict[str, Any] = json.loads(pg_parser.parse_sql_json(statement))
    return tree["stmts"][0]["stmt"]


def why_whole(conn: psycopg.Connection, tree: dict[str, Any], table: str) -> str | None:
    """Why the query must be recorded as one slice; None when it may be sliced over `table`."""
    if table not in set(relations(tree)):
        return f"it does not read the dataset's table {table}"
    for key, node in walk(tree):
        if key in WHOLE_RESULT_KEYS and node:
            return WHOLE_RESULT_KEYS[key]
        if key == "distinctClause" and any(node):  # DISTINCT ON (...); plain DISTINCT is [{}]
            return "it has DISTINCT ON"
        if key == "FuncCall" and "over" in node:
            return "it has a window function"
    return function_reason(conn, sorted(set(function_names(tree))))


def function_reason(conn: psycopg.Connection, names: list[str]) -> str | None:
    """Why any of the called functions keeps the query whole: volatile, aggregate or window
    (any function of that name, per pg_proc), or one that reads the transaction's clock."""
    if clock := sorted(CLOCK_FUNCTIONS.intersection(names)):
        return f"it reads the clock ({clock[0]}())"
    if not names:
        return None
    rows = conn.execute(
        """SELECT proname, bool_or(provolatile = 'v'), bool_or(prokind IN ('a', 'w'))
           FROM pg_proc WHERE proname = ANY (%s) GROUP BY proname ORDER BY proname""",
        (names,),
    ).fetchall()
    for name, volatile, aggregate in rows:
        if volatile:
            return f"it calls a volatile function ({name}())"
        if aggregate:
            return f"it aggregates ({name}())"
    return None


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a parse tree, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def relations(tree: dict[str, Any]) -> Iterator[str]:
    """The names of the tables and views the query reads: each relation it names without a schema
    or in `public`, less the names its WITH clauses define."""
    defined = {node["ctename"] for key, node in walk(tree) if key == "CommonTableExpr"}
    for key, node in walk(tree):
        if (
            key == "RangeVar"
            and node.get("schemaname", "public") == "public"
            and node["relname"] not in defined
        ):
            yield node["relname"]


def function_names(tree: dict[str, Any]) -> Iterator[str]:
    for key, node in walk(tree):
        if key == "FuncCall":
            yield node["funcname"][-1]["String"]["sval"].lower()
