"""Embeddings in the catalog (docs/content.md): the images' vectors under each model, searchable
with pgvector from plain SQL.

A dataset's embeddings under one model name are a table of their own, `embeddings_<set id>`
(id, embedding vector(dimensions), image: the sha256 of the bytes embedded), with an HNSW index
for cosine distance (`<=>`), kept as rows are added. The view `embeddings` (dataset, id, model,
embedding) is their UNION ALL: a query naming a dataset and a model reads only that set's table
(PostgreSQL drops the other branches) and orders by its index. One table per set because an HNSW
index needs a fixed dimension, and models differ in theirs. A model of other bytes under the same
name replaces the set: vectors of two models are not comparable.

Only where the `vector` extension is available; everything else of Quarry works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from common.config import Settings
from common.db import take_lock
from common.errors import ConfigError

EMBEDDINGS_LOCK = "embeddings"  # a row of quarry_locks: sets and the view change one at a time
VECTOR_MISSING = (
    "this PostgreSQL has no pgvector (the `vector` extension), which a model with an embedding"
    " output needs: point DATABASE_URL at one that has it (`make up` starts one), or run"
    " the job without a model that declares quarry.embedding"
)
INDEX_OPS = "vector_cosine_ops"  # the index serves ORDER BY embedding <=> ...


@dataclass(frozen=True)
class EmbeddingSet:
    """The embeddings of one dataset under one model name."""

    id: int
    dataset: str
    model: str
    dimensions: int

    @property
    def table(self) -> str:
        return f"embeddings_{self.id}"


def vector_available(conn: psycopg.Connection) -> bool:
    """Whether this server offers pgvector (installed in this database or not)."""
    row = conn.execute("SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'vector')").fetchone()
    return bool(row and row[0])


def ensure_vector(conn: psycopg.Connection) -> None:
    """The `vector` extension in this database, or ConfigError (one line) naming the fix."""
    if conn.execute("SELECT FROM pg_extension WHERE extname = 'vector'").fetchone() is not None:
        return
    if not vector_available(conn):
        raise ConfigError(VECTOR_MISSING)
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"cannot create the vector extension: {exc.diag.message_primary}; have an administrator"
            " run CREATE EXTENSION vector in this database"
        ) from exc


def ensure_set(
    conn: psycopg.Connection, settings: Settings, dataset: str, model: str, digest: bytes, dimensions: int
) -> EmbeddingSet:
    """The set a job with this model records into: kept when the model's bytes are the same,
    else made anew (the old one dropped), with its table, index, grants and the view."""
    ensure_vector(conn)
    with conn.transaction():
        take_lock(conn, EMBEDDINGS_LOCK)
        row = conn.execute(
            "SELECT id, digest, dimensions FROM embedding_sets WHERE dataset = %s AND model = %s",
            (dataset, model),
        ).fetchone()
        if row is not None and bytes(row[1]) == digest and row[2] == dimensions:
            return EmbeddingSet(row[0], dataset, model, dimensions)
        if row is not None:
            drop_sets(conn, [row[0]])
        created = conn.execute(
            "INSERT INTO embedding_sets (dataset, model, digest, dimensions)"
            " VALUES (%s, %s, %s, %s) RETURNING id",
            (dataset, model, digest, dimensions),
        ).fetchone()
        assert created is not None
        found = EmbeddingSet(created[0], dataset, model, dimensions)
        table = sql.Identifier(found.table)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, embedding vector({}) NOT NULL, image bytea NOT NULL)"
            ).format(table, sql.Literal(dimensions))
        )
        conn.execute(
            sql.SQL("CREATE INDEX ON {} USING hnsw (embedding {})").format(table, sql.SQL(INDEX_OPS))
        )
        if settings.worker_role:
            conn.execute(
                sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(
                    table, sql.Identifier(settings.worker_role)
                )
            )
        replace_view(conn, settings)
    return found


def drop_sets(conn: psycopg.Connection, ids: Sequence[int], settings: Settings | None = None) -> None:
    """Drop sets (their rows and tables) and, with `settings`, rebuild the view without them; in
    the caller's transaction, under EMBEDDINGS_LOCK."""
    if not ids:
        return
    conn.execute("DELETE FROM embedding_sets WHERE id = ANY(%s)", (list(ids),))
    if settings is not None:
        replace_view(conn, settings)
    for set_id in ids:
        # the view is rebuilt first when the caller passes settings; ensure_set rebuilds it after
        conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(f"embeddings_{set_id}"))
        )


def drop_dataset_sets(conn: psycopg.Connection, settings: Settings, dataset: str) -> None:
    """Remove a dropped dataset's embeddings (where pgvector is installed)."""
    if conn.execute("SELECT to_regclass('embedding_sets') IS NOT NULL").fetchone() in (None, (False,)):
        return
    ids = [row[0] for row in conn.execute("SELECT id FROM embedding_sets WHERE dataset = %s", (dataset,))]
    if ids:
        take_lock(conn, EMBEDDINGS_LOCK)
        drop_sets(conn, ids, settings)


def replace_view(conn: psycopg.Connection, settings: Settings) -> None:
    """The `embeddings` view over every set's table, readable by the query role."""
    sets = conn.execute("SELECT id, dataset, model FROM embedding_sets ORDER BY id").fetchall()
    branches: list[sql.Composable] = [
        sql.SQL(
            "SELECT {}::text AS dataset, e.id, {}::text AS model, e.embedding::vector AS embedding FROM {} e"
        ).format(sql.Literal(dataset), sql.Literal(model), sql.Identifier(f"embeddings_{set_id}"))
        for set_id, dataset, model in sets
    ] or [
        sql.SQL(
            "SELECT NULL::text AS dataset, NULL::bigint AS id, NULL::text AS model,"
            " NULL::vector AS embedding WHERE false"
        )
    ]
    conn.execute("DROP VIEW IF EXISTS embeddings")
    conn.execute(sql.SQL("CREATE VIEW embeddings AS ") + sql.SQL(" UNION ALL ").join(branches))
    conn.execute(sql.SQL("GRANT SELECT ON embeddings TO {}").format(sql.Identifier(settings.query_role)))


def record_embeddings(
    conn: psycopg.Connection, set_id: int, rows: Sequence[tuple[int, list[float], bytes]]
) -> None:
    """(image id, embedding, sha256 of the bytes embedded) into a set; a row whose image bytes
    are the same is left as it is (no index churn when a job runs again)."""
    if not rows:
        return
    table = sql.Identifier(f"embeddings_{set_id}")
    conn.execute(
        sql.SQL(
            "INSERT INTO {} AS e (id, embedding, image)"
            " SELECT i, v::vector, s FROM unnest(%s::bigint[], %s::text[], %s::bytea[]) AS r (i, v, s)"
            " ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding, image = EXCLUDED.image"
            " WHERE e.image IS DISTINCT FROM EXCLUDED.image"
        ).format(table),
        (
            [row[0] for row in rows],
            ["[" + ",".join(map(repr, row[1])) + "]" for row in rows],  # float32 values: exact
            [row[2] for row in rows],
        ),
    )


def similar_query(
    conn: psycopg.Connection,
    dataset: str,
    id_column: str,
    image_id: int,
    k: int,
    model: str,
    where: str | None,
) -> str:
    """The SQL of the `k` images of `dataset` nearest to `image_id` under `model` (cosine distance,
    served by the set's HNSW index), with `where` (a condition on the dataset's columns, as `s`)
    applied first: columns `id` and `distance`, nearest first. Plain SQL for `producer run`."""
    table, column = sql.Identifier(dataset), sql.Identifier(id_column)
    anchor = sql.SQL(
        "(SELECT embedding FROM embeddings WHERE dataset = {} AND model = {} AND id = {})"
    ).format(sql.Literal(dataset), sql.Literal(model), sql.Literal(int(image_id)))
    text = sql.SQL(
        "SELECT s.{column} AS id, e.embedding <=> {anchor} AS distance\n"
        "FROM {table} s JOIN embeddings e\n"
        "  ON e.dataset = {dataset} AND e.model = {model} AND e.id = s.{column}\n"
        "WHERE s.{column} <> {image}{where}\n"
        "ORDER BY e.embedding <=> {anchor}\n"
        "LIMIT {k}"
    ).format(
        column=column,
        anchor=anchor,
        table=table,
        dataset=sql.Literal(dataset),
        model=sql.Literal(model),
        image=sql.Literal(int(image_id)),
        where=sql.SQL(" AND ({})").format(sql.SQL(where)) if where else sql.SQL(""),
        k=sql.Literal(int(k)),
    )
    return text.as_string(conn)
