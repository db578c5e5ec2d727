"""Similarity search at scale: Quarry's embedding tables and HNSW index against an exact scan,
in one run on one PostgreSQL with pgvector (this machine's when it has it, else the embedded one).

--count synthetic 256-dimension embeddings (the shipped model's size) in --clusters clusters, with
planted neighbours: --queries anchors get 10 near copies each. A catalog table gives each id a
`category` of 20 (5% of the rows each). Quarry's own set (common/embeddings.py: its table, the
`embeddings` view) is filled, then its HNSW index is built (the time and bytes per vector are
reported), and the rate at which rows are added to the indexed set, as a job's inference pool
adds them. Each anchor is then searched with the issue's query shape through the view: its 10
nearest of one category (WHERE s.category = c) and its 10 nearest overall, with the session
settings user SQL runs with (quarry/query.py's VECTOR_SEARCH), at two hnsw.ef_search values, and
once with index scans off (the exact answer). Reported: p50/p95 latency, recall@10 against the
exact answer, and how many of the planted copies came back.

Run: python -m bench.similarity [--count 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time

import numpy as np
import psycopg

from bench.scratch import scratch_database
from common.config import Settings
from common.db import connect, ensure_schema
from common.embeddings import EmbeddingSet, ensure_set
from common.roles import ensure_roles
from quarry.query import VECTOR_SEARCH
from tests.vector_server import vector_server

DIMENSIONS = 256
CATEGORIES = 20
FILTERED = """SELECT s.id FROM items s
JOIN embeddings e ON e.dataset = 'items' AND e.id = s.id AND e.model = 'bench'
WHERE s.category = %(category)s AND s.id <> %(anchor)s
ORDER BY e.embedding <=> (SELECT embedding FROM embeddings WHERE dataset = 'items' AND id = %(anchor)s
                          AND model = 'bench')
LIMIT 10"""
UNFILTERED = """SELECT e.id FROM embeddings e WHERE e.dataset = 'items' AND e.model = 'bench'
ORDER BY e.embedding <=> (SELECT embedding FROM embeddings WHERE dataset = 'items' AND id = %(anchor)s
                          AND model = 'bench')
LIMIT 11"""


def unindexed_set(conn: psycopg.Connection, settings: Settings) -> EmbeddingSet:
    """Quarry's schema and roles, the catalog table `items`, and the embedding set of dataset
    `items` under model `bench`, its HNSW index dropped (to be built after the load)."""
    ensure_schema(conn)
    ensure_roles(conn, settings)
    conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, category integer NOT NULL)")
    found = ensure_set(conn, settings, "items", "bench", b"bench", DIMENSIONS)
    conn.execute(f"DROP INDEX {found.table}_embedding_idx")
    return found


def fill(conn: psycopg.Connection, table: str, count: int, clusters: int, queries: int) -> list[int]:
    """Rows 1..count: cluster centres plus noise, streamed in with COPY; the last queries x 10
    rows are near copies of the anchors (ids 1..queries). Returns the anchors' ids."""
    rng = np.random.default_rng(42)
    centres = rng.uniform(-0.5, 0.5, (clusters, DIMENSIONS)).astype(np.float32)
    planted = queries * 10
    batch = 20_000
    with conn.cursor().copy(f"COPY {table} (id, embedding, image) FROM STDIN") as copy:
        for start in range(1, count - planted + 1, batch):
            ids = np.arange(start, min(start + batch, count - planted + 1))
            vectors = centres[ids % clusters] + rng.uniform(-0.3, 0.3, (len(ids), DIMENSIONS)).astype(
                np.float32
            )
            copy.write(rows_text(ids, vectors))
    conn.execute(  # each anchor's 10 copies, a little apart from it
        f"INSERT INTO {table} (id, embedding, image)"
        f" SELECT %s + (a.id - 1) * 10 + k, (SELECT array_agg(x + (random()::real - 0.5) * 0.05)"
        f"   FROM unnest(a.embedding::real[]) x WHERE k > 0)::vector, '\\x00'::bytea"
        f" FROM {table} a, generate_series(1, 10) k WHERE a.id <= %s",
        (count - planted, queries),
    )
    conn.execute(  # a planted copy is in its anchor's category; every other row in one of 20
        "INSERT INTO items SELECT g, CASE WHEN g > %(first)s"
        " THEN ((((g - %(first)s - 1) / 10 + 1) * 7919) %% %(n)s)"
        " ELSE (g * 7919) %% %(n)s END FROM generate_series(1::bigint, %(count)s) g",
        {"first": count - planted, "n": CATEGORIES, "count": count},
    )
    return list(range(1, queries + 1))


def rows_text(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """COPY's text format: id, the vector as [x,...], an empty image digest."""
    out = io.BytesIO()
    text = np.char.add(ids.astype(str), "\t[")
    body = io.StringIO()
    np.savetxt(body, vectors, fmt="%.5f", delimiter=",")
    for prefix, line in zip(text, body.getvalue().splitlines(), strict=True):
        out.write(f"{prefix}{line}]\t\\\\x00\n".encode())
    return out.getvalue()


QUERIES = (("filtered", FILTERED), ("filtered, other category", FILTERED), ("unfiltered", UNFILTERED))


def category(anchor: int, query: str) -> int:
    """The anchor's own category (its copies are there), or the next one (no planted copy)."""
    own = (anchor * 7919) % CATEGORIES
    return (own + 1) % CATEGORIES if "other" in query else own


def timed(conn: psycopg.Connection, query: str, params: dict[str, int]) -> tuple[float, list[int]]:
    started = time.perf_counter()
    rows = [
        row[0] for row in conn.execute(query, params, prepare=False)
    ]  # planned under the settings of the run
    return time.perf_counter() - started, rows


def search(conn: psycopg.Connection, anchors: list[int], settings_sql: str) -> dict[str, object]:
    """Both queries for every anchor under `settings_sql`; latencies and answers."""
    out: dict[str, object] = {}
    with conn.transaction():
        conn.execute(settings_sql)
        for name, query in QUERIES:
            times, answers = [], []
            for anchor in anchors:
                seconds, rows = timed(conn, query, {"anchor": anchor, "category": category(anchor, name)})
                times.append(seconds)
                answers.append(rows)
            out[name] = (times, answers)
    return out


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.count:,} embeddings of"
        f" {DIMENSIONS} dimensions, {args.clusters} clusters, {args.queries} anchors with 10 planted copies"
    )
    with vector_server() as server, scratch_database("bench_similarity", server) as url:
        settings = Settings(database_url=url)
        with connect(url, autocommit=True) as conn:
            found = unindexed_set(conn, settings)  # its index is built after the load, timed
            version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
            print(f"PostgreSQL {conn.info.server_version}, pgvector {version[0] if version else '?'}")
            started = time.perf_counter()
            anchors = fill(conn, found.table, args.count, args.clusters, args.queries)
            print(f"loaded in {time.perf_counter() - started:.1f} s")
            conn.execute("VACUUM ANALYZE items")
            conn.execute(f"VACUUM ANALYZE {found.table}")
            conn.execute("SET maintenance_work_mem = '4GB'; SET max_parallel_maintenance_workers = 1")
            started = time.perf_counter()
            conn.execute(
                f"CREATE INDEX {found.table}_embedding_idx ON {found.table}"
                " USING hnsw (embedding vector_cosine_ops)"
            )
            built = time.perf_counter() - started
            sizes = conn.execute(
                "SELECT pg_relation_size(%s), pg_total_relation_size(%s) - pg_indexes_size(%s)",
                (f"{found.table}_embedding_idx", found.table, found.table),
            ).fetchone()
            assert sizes is not None
            print(
                f"HNSW build: {built:.1f} s ({args.count / built:,.0f} vectors/s);"
                f" index {sizes[0] / args.count:.0f} B/vector, table {sizes[1] / args.count:.0f} B/vector"
            )
            for name, query in QUERIES[::2]:
                with conn.transaction(force_rollback=True):
                    conn.execute(VECTOR_SEARCH)
                    plan = [row[0] for row in conn.execute("EXPLAIN " + query, {"anchor": 1, "category": 1})]
                index = "HNSW index" if any("_embedding_idx" in line for line in plan) else "no index (exact)"
                print(f"{name} plan: {index}: {' / '.join(line.strip() for line in plan[:6])}")
            added = min(20_000, args.count // 10)  # rows a job adds to a set that is indexed already
            started = time.perf_counter()
            conn.execute(
                f"INSERT INTO {found.table} (id, embedding, image) SELECT %s + id, embedding, image"
                f" FROM {found.table} WHERE id <= %s",
                (args.count, added),
            )
            inserted = time.perf_counter() - started
            conn.execute(f"DELETE FROM {found.table} WHERE id > %s", (args.count,))
            print(f"adding {added:,} rows to the indexed set: {added / inserted:,.0f} rows/s (one session)")
            conn.autocommit = False
            exact = search(
                conn,
                anchors,
                "SET LOCAL enable_indexscan = off; SET LOCAL max_parallel_workers_per_gather = 2",
            )
            conn.rollback()
            for ef_search in (40, None):  # pgvector's default; Quarry's (VECTOR_SEARCH)
                extra = f"; SET LOCAL hnsw.ef_search = {ef_search}" if ef_search else ""
                run = search(conn, anchors, VECTOR_SEARCH + extra)
                conn.rollback()
                for name, _ in QUERIES:
                    times, answers = run[name]  # type: ignore[misc]
                    exact_times, exact_answers = exact[name]  # type: ignore[misc]
                    recall = statistics.mean(
                        len(set(a) & set(e)) / max(len(e), 1)
                        for a, e in zip(answers, exact_answers, strict=True)
                    )
                    full = sum(len(a) == len(e) for a, e in zip(answers, exact_answers, strict=True))
                    planted = ""
                    if name != "filtered, other category":
                        copies = [
                            len(
                                {args.count - args.queries * 10 + (anchor - 1) * 10 + k for k in range(1, 11)}
                                & set(a)
                            )
                            for anchor, a in zip(anchors, answers, strict=True)
                        ]
                        planted = f", planted copies found {sum(copies) / (10 * len(copies)):.3f}"
                    how = "ef_search=40" if ef_search else "as Quarry runs it"
                    print(
                        f"{name:24s} {how}: HNSW p50 {p(times, 50) * 1000:.1f} ms,"
                        f" p95 {p(times, 95) * 1000:.1f} ms;"
                        f" exact scan p50 {p(exact_times, 50) * 1000:.1f} ms,"
                        f" p95 {p(exact_times, 95) * 1000:.1f} ms ({p(exact_times, 50) / p(times, 50):.0f}x);"
                        f" recall@10 {recall:.3f}; full LIMIT {full}/{len(answers)}{planted}"
                    )


if __name__ == "__main__":
    main()
