"""Planning an ingest that runs through the pools: a manifest (its files, and each Parquet file's
row groups) or a WebDataset prefix (its tars) becomes units recorded as a job; each unit is
registered by the transform pool (common/ingest/units.py). Units an earlier ingest registered
unchanged are left out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import Settings
from common.datasets import Dataset, register_dataset
from common.errors import ObjectMissing, UserError
from common.ingest.manifest import (
    BadLines,
    check_row_group,
    format_of,
    local_copy,
    manifest_sources,
    read_batches,
)
from common.ingest.summary import IngestSummary
from common.ingest.tables import create_catalog, table_columns
from common.ingest.units import IngestPlan, Unit, record_ingest, registered_before
from common.ingest.webdataset import ASSIGNED_ID, plan_webdataset
from common.roles import grant_dataset_writes
from common.storage import ObjectStore, parse_s3_uri

STAGED = "_quarry/manifests"  # where a local manifest file is put for the pools to read


@dataclass(frozen=True)
class ManifestRequest:
    """What a manifest ingest needs from the user."""

    name: str
    id_column: str
    image_column: str
    overrides: dict[str, str]


def plan_manifest(
    conn: psycopg.Connection,
    store: ObjectStore,
    source: str,
    request: ManifestRequest,
    raw_bucket: str,
    job_id: str,
    summary: IngestSummary,
) -> IngestPlan | None:
    """Create the dataset's table from the first file's columns and record one unit per file
    (per row group for Parquet); None when every unit was registered before."""
    files = manifest_sources(store, source)
    if not files:
        raise UserError(f"{source}: no manifest files (.csv, .jsonl, .parquet) there")
    source_format = str(format_of(files[0]))  # the first file's: each unit reads by its own name
    schema, first = first_rows(store, source_format, files[0], set(request.overrides), request.image_column)
    check_sources(store.settings, first, request.image_column, files[0])  # before anything is written
    objects = [stage(store, raw_bucket, request.name, name) for name in files]
    with conn.transaction():
        manifest_dataset(conn, request, schema, files[0], source_format)
    units = []
    for uri, size, etag in objects:
        if format_of(uri) == "parquet":
            bucket, key = parse_s3_uri(uri)
            parquet = pq.ParquetFile(f"{bucket}/{key}", filesystem=store.arrow)
            for group in range(parquet.num_row_groups):
                check_row_group(parquet, uri, group, store.settings.row_group_max_bytes)
                units.append(Unit(uri, size, etag, group))
        else:
            units.append(Unit(uri, size, etag))
    grant_dataset_writes(conn, store.settings, request.name)  # the pools register its rows
    return record_units(
        conn,
        IngestPlan(job_id, request.name, source_format, request.image_column, sorted(request.overrides)),
        f"ingest {source}",
        units,
        summary,
    )


def plan_shards(
    conn: psycopg.Connection,
    store: ObjectStore,
    prefix: str,
    name: str,
    id_column: str | None,
    overrides: dict[str, str],
    job_id: str,
    summary: IngestSummary,
) -> IngestPlan | None:
    """One unit per tar not registered before; None when there is none."""
    _, tars = plan_webdataset(conn, store, prefix, name, id_column, overrides, summary)
    units = [Unit(uri, size, etag, None, companion) for uri, size, etag, companion in tars]
    grant_dataset_writes(conn, store.settings, name)  # the pools register its rows
    return record_units(conn, IngestPlan(job_id, name, "webdataset"), f"ingest {prefix}", units, summary)


def record_units(
    conn: psycopg.Connection, plan: IngestPlan, what: str, units: list[Unit], summary: IngestSummary
) -> IngestPlan | None:
    done = registered_before(conn, units)
    todo = [unit for unit in units if (unit.source, unit.part, unit.etag) not in done]
    summary.units_present = len(units) - len(todo)
    if not todo:
        return None
    record_ingest(conn, plan, what, todo)
    return plan


def stage(store: ObjectStore, bucket: str, dataset: str, name: str) -> tuple[str, int, str]:
    """(s3:// URI, size, ETag) of a manifest file where the pools can read it: an s3:// object as
    it is, a local file put once in the raw bucket under its content's hash and its name."""
    if name.startswith("s3://"):
        size, etag = store.head(*parse_s3_uri(name))
        return name, size, etag
    path = Path(name)
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    key = f"{STAGED}/{dataset}/{digest[:32]}/{path.name}"  # its name shows in messages
    try:
        size, etag = store.head(bucket, key)
    except ObjectMissing:
        store.upload_file(str(path), bucket, key, content_type="application/octet-stream")
        size, etag = store.head(bucket, key)
    return f"s3://{bucket}/{key}", size, etag


FIRST_ROWS = 1000  # a Parquet manifest's rows read to check its first images' buckets


def first_rows(
    store: ObjectStore, source_format: str, name: str, text_columns: set[str], image_column: str
) -> tuple[pa.Schema, pa.RecordBatch]:
    """The columns of the first manifest file (Parquet's footer, or the first rows' inferred
    types) and its first rows, in one read of it where it is (a local path or an s3:// object):
    of a Parquet file, only the image column of its first FIRST_ROWS rows."""
    if source_format == "parquet":
        try:
            if name.startswith("s3://"):
                bucket, key = parse_s3_uri(name)
                parquet = pq.ParquetFile(f"{bucket}/{key}", filesystem=store.arrow)
            else:
                parquet = pq.ParquetFile(name)
            columns = [image_column] if image_column in parquet.schema_arrow.names else []
            first = next(parquet.iter_batches(batch_size=FIRST_ROWS, columns=columns), None)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"manifest {name}: not a Parquet file ({exc})") from exc
        return parquet.schema_arrow, first if first is not None else pa.record_batch([], names=[])
    with local_copy(store, name) as path:
        first = next(read_batches(path, name, source_format, text_columns, BadLines()), None)
    if first is None:
        raise UserError(f"manifest {name}: no rows")
    return first.schema, first


def check_sources(settings: Settings, rows: pa.RecordBatch, image_column: str, name: str) -> None:
    """UserError when one of these manifest rows names an image in a bucket sources may not come
    from, or when none of them is an s3:// URI (a local manifest of files here is packed instead:
    quarry/local_images.py); later rows like them become failed locations, unread."""
    if image_column not in rows.schema.names:
        return  # manifest_dataset says so
    values = [value for value in rows.column(image_column).to_pylist() if isinstance(value, str) and value]
    if values and not any(value.startswith("s3://") for value in values):
        raise UserError(
            f"manifest {name}: column {image_column!r} holds {values[0]!r}: neither an s3:// URI nor"
            " a file on this machine (a path absolute or relative to a local manifest)"
        )
    for value in values:
        if refusal := settings.refuse_source(value):
            raise UserError(f"manifest {name}: {refusal}")


def manifest_dataset(
    conn: psycopg.Connection, request: ManifestRequest, schema: pa.Schema, source: str, source_format: str
) -> Dataset:
    """The dataset's table from the first manifest's columns; string keys get assigned ids."""
    for column in (request.id_column, request.image_column):
        if column not in schema.names:
            raise UserError(f"manifest {source}: no column {column!r} (columns: {', '.join(schema.names)})")
    id_type = schema.field(request.id_column).type
    keyed = request.id_column not in request.overrides and not pa.types.is_integer(id_type)
    if keyed and not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise UserError(
            f"manifest {source}: id column {request.id_column!r} is {id_type}, not integers or strings"
        )
    if keyed and ASSIGNED_ID in schema.names:
        raise UserError(
            f"manifest {source}: string keys get Quarry-assigned ids in a column {ASSIGNED_ID!r},"
            " and the manifest has one: rename it"
        )
    columns = table_columns(schema, request.overrides)
    id_column = ASSIGNED_ID if keyed else request.id_column
    key_column = request.id_column if keyed else None
    create_catalog(conn, request.name, columns, id_column, key_column)
    return register_dataset(conn, request.name, id_column, key_column, request.image_column, source_format)
