"""An ingest through the pools: a job whose chunk i registers unit i (a manifest file, one Parquet
row group of one, or one tar shard). The producer plans and records the units; the transform pool
runs each one in one transaction with its ledger record, so a unit registers exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from itertools import chain
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg.types.json import Jsonb

from common.config import Settings
from common.datasets import Dataset, get_dataset
from common.errors import PermanentError, UserError
from common.ingest.manifest import BadLines, check_row_group, format_of, local_copy, read_batches
from common.ingest.register import add_catalog_rows, add_object_locations, load_rows
from common.ingest.summary import IngestSummary
from common.ingest.webdataset import index_shard, register_tar
from common.jobs import record_job
from common.jobspec import INGEST_KIND
from common.ledger import ItemResult, Ticket, record_progress
from common.storage import ObjectStore, parse_s3_uri


@dataclass(frozen=True)
class IngestPlan:
    """What every unit of one ingest needs to know; the spec its messages carry."""

    job_id: str
    dataset: str
    source_format: str  # csv, jsonl, parquet or webdataset
    image_column: str | None = None
    text_columns: list[str] = field(default_factory=list)  # typed by the user: read as text
    kind: str = INGEST_KIND

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> IngestPlan:
        return cls(**message)


@dataclass(frozen=True)
class Unit:
    """One source to register: an object (and a Parquet row group of it), as planned."""

    source: str
    size: int
    etag: str
    part: int | None = None  # Parquet row group; None: the whole file (or a tar)
    companion: str | None = None  # a tar's metadata table (its NNNNN.parquet), if any


def record_ingest(conn: psycopg.Connection, plan: IngestPlan, what: str, units: list[Unit]) -> None:
    """Record the ingest job and its units in one transaction: unit i is chunk i, one item."""
    with conn.transaction():
        record_job(conn, plan.job_id, what, plan.to_message(), ((i, [i], 1) for i in range(len(units))))
        with conn.cursor().copy(
            "COPY ingest_units (job_id, unit, source, part, size, etag, companion) FROM STDIN"
        ) as copy:
            for index, unit in enumerate(units):
                copy.write_row(
                    (plan.job_id, index, unit.source, unit.part, unit.size, unit.etag, unit.companion)
                )


def registered_before(conn: psycopg.Connection, units: list[Unit]) -> set[tuple[str, int | None, str]]:
    """(source, part, etag) of the units an earlier ingest registered without a failure."""
    rows = conn.execute(
        """SELECT u.source, u.part, u.etag FROM ingest_units u
           JOIN job_chunks c ON c.job_id = u.job_id AND c.chunk_index = u.unit
           WHERE u.source = ANY (%s) AND c.state = 'finished' AND c.done = c.items""",
        ([unit.source for unit in units],),
    ).fetchall()
    return {(source, part, etag) for source, part, etag in rows}


def run_unit(
    conn: psycopg.Connection, store: ObjectStore, plan: IngestPlan, ticket: Ticket, lease_s: int
) -> int:
    """Register one unit and record it in the ledger, in one transaction (a re-run after a crash
    finds the rows there and adds none). Its object is read from S3 and indexed (a tar) or copied
    to local disk (a manifest file, a row group) first, before the transaction opens: no
    transaction waits on S3. A unit that cannot be registered (a duplicate id, a truncated shard)
    fails as the chunk's one item, with why; nothing of it is kept. Returns the rows it added."""
    summary = IngestSummary()
    try:
        unit = read_unit(conn, ticket)
        dataset = get_dataset(conn, plan.dataset)
        if plan.source_format == "webdataset":
            indexed = index_shard(store, unit.source, unit.size, unit.companion, summary)
            with conn.transaction():
                register_tar(conn, dataset, unit.source, unit.size, unit.etag, indexed, summary)
                finish_unit(conn, ticket, summary, lease_s)
        else:
            bad = BadLines()
            with part_batches(store, plan, unit, bad) as batches, conn.transaction():
                register_part(conn, dataset, plan, batches, bad, summary, store.settings)
                finish_unit(conn, ticket, summary, lease_s)
    except (UserError, PermanentError, psycopg.errors.DataError, psycopg.errors.UndefinedColumn) as exc:
        error = f"{unit_name(conn, ticket)}: {str(exc).splitlines()[0]}"
        record_progress(
            conn, ticket, [ItemResult(ticket.chunk, 0, 0, "failed", error=error)], "failures", lease_s
        )
        return 0
    return summary.images


def finish_unit(conn: psycopg.Connection, ticket: Ticket, summary: IngestSummary, lease_s: int) -> None:
    """Keep the unit's counts and mark its one item done (in the registering transaction)."""
    conn.execute(
        "UPDATE ingest_units SET counts = %s WHERE job_id = %s AND unit = %s",
        (Jsonb(counts_of(summary)), ticket.job_id, ticket.chunk),
    )
    record_progress(conn, ticket, [ItemResult(ticket.chunk, 0, 0, "done")], "failures", lease_s)


def read_unit(conn: psycopg.Connection, ticket: Ticket) -> Unit:
    row = conn.execute(
        "SELECT source, size, etag, part, companion FROM ingest_units WHERE job_id = %s AND unit = %s",
        (ticket.job_id, ticket.chunk),
    ).fetchone()
    if row is None:
        raise UserError(f"job {ticket.job_id} has no ingest unit {ticket.chunk}")
    return Unit(*row)


def unit_name(conn: psycopg.Connection, ticket: Ticket) -> str:
    unit = read_unit(conn, ticket)
    return unit.source if unit.part is None else f"{unit.source} (row group {unit.part})"


def register_part(
    conn: psycopg.Connection,
    dataset: Dataset,
    plan: IngestPlan,
    batches: Iterator[pa.RecordBatch],
    bad: BadLines,
    summary: IngestSummary,
    settings: Settings,
) -> None:
    """A manifest file's rows (or one row group's), read already, into the catalog, each image
    where it is."""
    assert plan.image_column is not None
    first = next(batches, None)
    if first is None:
        return
    columns = first.schema.names
    summary.rows = load_rows(conn, dataset, columns, chain([first], batches))
    summary.images = add_catalog_rows(conn, dataset, columns)
    summary.present = summary.rows - summary.images
    add_object_locations(conn, dataset, plan.image_column, settings)
    summary.rejected = bad.count
    summary.problems = bad.shown
    summary.problem_count = len(bad.shown)


@contextmanager
def part_batches(
    store: ObjectStore, plan: IngestPlan, unit: Unit, bad: BadLines
) -> Iterator[Iterator[pa.RecordBatch]]:
    """The unit's rows as Arrow batches: a Parquet row group read by ranged GETs, or a CSV/JSON
    Lines file streamed to a temporary file first."""
    if unit.part is None:
        with local_copy(store, unit.source) as path:
            source_format = format_of(unit.source) or plan.source_format
            yield read_batches(
                path,
                unit.source,
                source_format,
                set(plan.text_columns),
                bad,
                store.settings.manifest_line_max_bytes,
            )
        return
    bucket, key = parse_s3_uri(unit.source)
    parquet = pq.ParquetFile(f"{bucket}/{key}", filesystem=store.arrow)
    check_row_group(parquet, unit.source, unit.part, store.settings.row_group_max_bytes)
    table = parquet.read_row_group(unit.part)
    for column in plan.text_columns:
        table = table.set_column(table.column_names.index(column), column, table[column].cast(pa.string()))
    yield iter(table.to_batches())


COUNTED = [f.name for f in fields(IngestSummary) if f.type in ("int", int) and f.name != "problem_count"]


def counts_of(summary: IngestSummary) -> dict[str, Any]:
    return {**{name: getattr(summary, name) for name in COUNTED}, "problems": summary.problems}


def registered_so_far(conn: psycopg.Connection, job_id: str) -> dict[str, int]:
    """Rows, images and shards an ingest job's finished units registered, summed (for progress)."""
    row = conn.execute(
        """SELECT coalesce(sum((counts->>'rows')::bigint), 0), coalesce(sum((counts->>'images')::bigint), 0),
                  coalesce(sum((counts->>'shards')::bigint), 0)
           FROM ingest_units WHERE job_id = %s AND counts IS NOT NULL""",
        (job_id,),
    ).fetchone()
    rows, images, shards = row or (0, 0, 0)
    return {"rows": int(rows), "images": int(images), "shards": int(shards)}


def add_unit_counts(conn: psycopg.Connection, job_id: str, summary: IngestSummary) -> None:
    """Fold every registered unit's counts, and every failed unit's error, into `summary`."""
    for (counts,) in conn.execute(
        "SELECT counts FROM ingest_units WHERE job_id = %s AND counts IS NOT NULL", (job_id,)
    ):
        for name in COUNTED:
            setattr(summary, name, getattr(summary, name) + int(counts.get(name, 0)))
        for problem in counts.get("problems", []):
            summary.report(problem)
    for (error,) in conn.execute(
        "SELECT error FROM job_items WHERE job_id = %s AND status = 'failed' ORDER BY image_id", (job_id,)
    ):
        summary.units_failed += 1
        summary.report(str(error))
