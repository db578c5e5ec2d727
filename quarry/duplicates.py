"""Near-duplicate groups of a dataset, from the embeddings of one model (`producer duplicates`;
docs/content.md, "Near-duplicates").

Candidate pairs come from the embedding set's HNSW index: each image's nearest others (SWEEP),
asked for a page of images at a time in id order (one statement a page, a LATERAL k-NN query per
image, run inside PostgreSQL), and kept when their cosine distance is at most the threshold; then
the images that found a pair are asked again, more widely (WIDEN). The pages are independent, so
DUPLICATES_CONNECTIONS of them are searched at once, each on its own connection (one server core
each). Pairs are joined into groups (union-find over the ids that have
a pair: no embedding is ever held here, and only the ids of images with a near-duplicate). A
group's id is its smallest image id. The groups replace the (dataset, model) rows of `duplicates`
in one transaction, so a query can keep one image of each group while the next run is under way.

Each search walks the index's graph through PostgreSQL's buffer pool: a server whose
shared_buffers cannot hold the index reads its pages from outside the pool for every image; the
command warns when that is the case (docs/scaling.md, "Near-duplicates").
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from common.config import Settings
from common.db import CONNECTION_LOST, connect, first_line
from common.errors import DatabaseUnavailable, UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "fashion-copies"  # the shipped copy-detection model (models/fashion-copies.md)
DEFAULT_THRESHOLD = 0.08  # cosine distance; docs/content.md has the measurements behind it
PAGE = 2000  # images a statement asks neighbours for
RANGE = "id > %(after)s AND id <= %(last)s"  # a page of the sweep over every image
LISTED = "id = ANY(%(ids)s)"  # a page of the images the sweep paired
Pair = tuple[int, int]
Page = dict[str, Any]  # the parameters of RANGE or LISTED


@dataclass(frozen=True)
class Sweep:
    neighbours: int  # asked of the index per image
    ef_search: int  # hnsw.ef_search: candidates a search keeps


SWEEP = Sweep(neighbours=8, ef_search=64)  # every image (docs/benchmarks.md, "Near-duplicates")
# The images SWEEP paired, asked again more widely: a group larger than SWEEP's neighbours, an
# image near two tight groups, a copy the narrower search did not reach.
WIDEN = Sweep(neighbours=32, ef_search=200)


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


def index_outgrows_buffers(conn: psycopg.Connection, table: str) -> str | None:
    """A one-line warning when the table's indexes are larger than the server's shared_buffers."""
    row = conn.execute(
        "SELECT pg_indexes_size(%s::regclass),"
        " (SELECT setting::bigint * 8192 FROM pg_settings WHERE name = 'shared_buffers')",
        (table,),
    ).fetchone()
    if row is None or row[0] <= row[1]:
        return None
    mib = 1024 * 1024
    return (
        f"the embeddings' index ({row[0] // mib} MiB) is larger than PostgreSQL's shared_buffers"
        f" ({row[1] // mib} MiB): every search reads index pages from outside the buffer pool,"
        ' which is slower (docs/scaling.md, "Near-duplicates")'
    )


def page_bounds(conn: psycopg.Connection, table: str) -> Iterator[Page]:
    """Each page of PAGE images in id order, as the parameters of RANGE."""
    last = sql.SQL("SELECT max(id) FROM (SELECT id FROM {t} WHERE id > %s ORDER BY id LIMIT %s) p").format(
        t=sql.Identifier(table)
    )
    after = -(2**63)
    while True:
        end = conn.execute(last, (after, PAGE)).fetchone()
        if end is None or end[0] is None:
            return
        yield {"after": after, "last": end[0]}
        after = end[0]


def listed_pages(ids: list[int]) -> Iterator[Page]:
    """`ids` in pages of PAGE, as the parameters of LISTED."""
    for start in range(0, len(ids), PAGE):
        yield {"ids": ids[start : start + PAGE]}


def search_page(
    conn: psycopg.Connection, table: str, threshold: float, sweep: Sweep, where: str, page: Page
) -> list[Pair]:
    """(smaller id, larger id) of each pair within `threshold` whose first image is in the page."""
    statement = sql.SQL(
        "SELECT a.id, n.id"
        " FROM (SELECT id, embedding FROM {t} WHERE " + where + ") a"
        " CROSS JOIN LATERAL (SELECT b.id, b.embedding <=> a.embedding AS distance FROM {t} b"
        " ORDER BY b.embedding <=> a.embedding LIMIT %(k)s) n"
        " WHERE n.id <> a.id AND n.distance <= %(threshold)s"
    ).format(t=sql.Identifier(table))
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(sweep.ef_search)))
        found = conn.execute(statement, {**page, "k": sweep.neighbours + 1, "threshold": threshold})
        return [(a, b) if a < b else (b, a) for a, b in found]


@contextlib.contextmanager
def searchers(database_url: str, count: int) -> Iterator[queue.Queue[psycopg.Connection]]:
    """`count` idle connections for the searches, closed when the context ends."""
    with contextlib.ExitStack() as stack:
        idle: queue.Queue[psycopg.Connection] = queue.Queue()
        for _ in range(count):
            idle.put(stack.enter_context(connect(database_url, autocommit=True)))
        yield idle


class Components:
    """Union-find over image ids: the groups the pairs joined so far."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def root(self, node: int) -> int:
        parent = self.parent
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def join(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def members(self) -> list[int]:
        """Every id with a pair, ascending."""
        return sorted(self.parent)

    def groups(self) -> dict[int, list[int]]:
        """{smallest id: sorted ids} of each group."""
        groups: dict[int, list[int]] = {}
        for node in self.parent:
            groups.setdefault(self.root(node), []).append(node)
        return {min(ids): sorted(ids) for ids in groups.values()}


def group(pairs: Iterator[Pair]) -> dict[int, list[int]]:
    """Connected components of the pairs: {smallest id: sorted ids}."""
    components = Components()
    for a, b in pairs:
        components.join(a, b)
    return components.groups()


def find_groups(
    conn: psycopg.Connection, settings: Settings, table: str, threshold: float
) -> dict[int, list[int]]:
    """The set's groups: SWEEP over every image in id ranges, then WIDEN over the images it
    paired; pages searched DUPLICATES_CONNECTIONS at a time, at most twice that many pages'
    pairs held."""
    count = settings.duplicates_connections
    components = Components()

    def search(sweep: Sweep, where: str, page: Page) -> list[Pair]:
        searcher = idle.get()
        try:
            return search_page(searcher, table, threshold, sweep, where, page)
        finally:
            idle.put(searcher)

    def join(searched: Iterable[Future[list[Pair]]]) -> None:
        for pairs in searched:
            for a, b in pairs.result():
                components.join(a, b)

    def join_all(sweep: Sweep, where: str, pages: Iterator[Page]) -> None:
        pending: set[Future[list[Pair]]] = set()
        try:
            for page in pages:
                pending.add(pool.submit(search, sweep, where, page))
                if len(pending) >= 2 * count:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    join(done)
            join(pending)
        finally:
            for pairs in pending:
                pairs.cancel()

    with searchers(settings.database_url, count) as idle, ThreadPoolExecutor(count) as pool:
        join_all(SWEEP, RANGE, page_bounds(conn, table))
        join_all(WIDEN, LISTED, listed_pages(components.members()))
    return components.groups()


def find_duplicates(
    conn: psycopg.Connection,
    settings: Settings,
    dataset: str,
    model: str = DEFAULT_MODEL,
    threshold: float = DEFAULT_THRESHOLD,
) -> DuplicateGroups:
    """Group the dataset's near-duplicates under `model` and record them in `duplicates`."""
    if not 0 <= threshold <= 2:
        raise UserError(f"--threshold {threshold} is not a cosine distance (0 to 2)")
    table = embedding_table(conn, dataset, model)
    if warning := index_outgrows_buffers(conn, table):
        log.warning(warning)
    try:
        groups = find_groups(conn, settings, table, threshold)
        images = record(conn, dataset, model, table, groups)
    except CONNECTION_LOST as exc:
        raise DatabaseUnavailable(
            f"the connection to PostgreSQL was lost while finding near-duplicates ({first_line(exc)}):"
            " the groups recorded before are kept; run the command again"
        ) from exc
    return DuplicateGroups(dataset, model, threshold, images, groups)


def record(
    conn: psycopg.Connection, dataset: str, model: str, table: str, groups: dict[int, list[int]]
) -> int:
    """Replace the (dataset, model) rows of `duplicates` with `groups`, in one transaction; the
    number of images in the set."""
    with conn.transaction():
        (images,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()  # type: ignore[misc]
        conn.execute("DELETE FROM duplicates WHERE dataset = %s AND model = %s", (dataset, model))
        with conn.cursor().copy("COPY duplicates (dataset, model, group_id, id) FROM STDIN") as copy:
            for group_id, ids in groups.items():
                for image_id in ids:
                    copy.write_row((dataset, model, group_id, image_id))
    return int(images)
