"""Near-duplicate groups of a dataset, from the embeddings of one model (`producer duplicates`;
docs/content.md, "Near-duplicates").

Candidate pairs come from the embedding set's HNSW index: each image's NEIGHBOURS nearest others,
asked for a page of images at a time in id order (one statement a page, a LATERAL k-NN query per
image, run inside PostgreSQL), and kept when their cosine distance is at most the threshold. Pairs
are joined into groups (union-find over the ids that have a pair: no embedding is ever held here,
and only the ids of images with a near-duplicate). A group's id is its smallest image id. The
groups replace the (dataset, model) rows of `duplicates` in one transaction, so a query can keep
one image of each group while the next run is under way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from common.errors import UserError

DEFAULT_MODEL = "fashion-copies"  # the shipped copy-detection model (models/fashion-copies.md)
DEFAULT_THRESHOLD = 0.08  # cosine distance; docs/content.md has the measurements behind it
NEIGHBOURS = 8  # candidates asked of the index per image
PAGE = 2000  # images a statement asks neighbours for


@dataclass(frozen=True)
class DuplicateGroups:
    dataset: str
    model: str
    threshold: float
    images: int  # in the embedding set
    groups: dict[int, list[int]]  # group id (its smallest image id) -> its image ids, ascending


def embedding_table(conn: psycopg.Connection, dataset: str, model: str) -> str:
    """The set's table, or UserError naming what to run first."""
    found = conn.execute("SELECT to_regclass('embedding_sets') IS NOT NULL").fetchone()
    row = None
    if found and found[0]:
        row = conn.execute(
            "SELECT id FROM embedding_sets WHERE dataset = %s AND model = %s", (dataset, model)
        ).fetchone()
    if row is None:
        raise UserError(
            f"dataset {dataset!r} has no embeddings under model {model!r}: run a job over it with"
            f" --model {model} first"
        )
    return f"embeddings_{row[0]}"


def candidate_pairs(conn: psycopg.Connection, table: str, threshold: float) -> Iterator[tuple[int, int]]:
    """(smaller id, larger id) of each pair within `threshold`, page by page in id order."""
    statement = sql.SQL(
        "SELECT a.id, n.id"
        " FROM (SELECT id, embedding FROM {t} WHERE id > %(after)s ORDER BY id LIMIT %(page)s) a"
        " CROSS JOIN LATERAL (SELECT b.id, b.embedding <=> a.embedding AS distance FROM {t} b"
        " ORDER BY b.embedding <=> a.embedding LIMIT %(k)s) n"
        " WHERE n.id <> a.id AND n.distance <= %(threshold)s"
    ).format(t=sql.Identifier(table))
    last = sql.SQL("SELECT max(id) FROM (SELECT id FROM {t} WHERE id > %s ORDER BY id LIMIT %s) p").format(
        t=sql.Identifier(table)
    )
    after = -(2**63)
    while True:
        end = conn.execute(last, (after, PAGE)).fetchone()
        if end is None or end[0] is None:
            return
        params = {"after": after, "page": PAGE, "k": NEIGHBOURS + 1, "threshold": threshold}
        for a, b in conn.execute(statement, params):
            yield (a, b) if a < b else (b, a)
        after = end[0]


def group(pairs: Iterator[tuple[int, int]]) -> dict[int, list[int]]:
    """Connected components of the pairs: {smallest id: sorted ids}."""
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for node in parent:
        groups.setdefault(root(node), []).append(node)
    return {min(ids): sorted(ids) for ids in groups.values()}


def find_duplicates(
    conn: psycopg.Connection, dataset: str, model: str = DEFAULT_MODEL, threshold: float = DEFAULT_THRESHOLD
) -> DuplicateGroups:
    """Group the dataset's near-duplicates under `model` and record them in `duplicates`."""
    if not 0 <= threshold <= 2:
        raise UserError(f"--threshold {threshold} is not a cosine distance (0 to 2)")
    table = embedding_table(conn, dataset, model)
    with conn.transaction():
        conn.execute("SET LOCAL hnsw.ef_search = 64")
        groups = group(candidate_pairs(conn, table, threshold))
        (images,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()  # type: ignore[misc]
        conn.execute("DELETE FROM duplicates WHERE dataset = %s AND model = %s", (dataset, model))
        rows = [(dataset, model, group_id, image_id) for group_id, ids in groups.items() for image_id in ids]
        with conn.cursor().copy("COPY duplicates (dataset, model, group_id, id) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    return DuplicateGroups(dataset, model, threshold, int(images), groups)
