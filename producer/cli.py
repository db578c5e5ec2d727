"""The `producer` command line."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from common.augment import parse_spec
from common.config import Settings, get_settings
from common.db import connect, ensure_database, ensure_schema
from common.errors import ConfigError, QuarryError, UserError
from common.jobs import cancel_job, iter_results, job_progress, list_jobs, retry_job
from common.jobspec import JobSpec
from common.model import Classifier, locate_model
from common.paths import MODELS_DIR
from common.storage import ObjectStore, parse_s3_uri
from producer.ingest import IngestSummary
from producer.ingest import ingest as run_ingest
from producer.preview import write_preview
from producer.progress import follow
from producer.submit import new_job_id, submit_job

EXIT_FAILED_ITEMS = 1
EXIT_REFUSED = 2
DEFAULT_SHARD_SIZE = 1000  # images per webdataset shard (img2dataset writes 10,000)
F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(command: F) -> F:
    """Turn Quarry errors into one line on stderr and an exit code; tracebacks are for bugs."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_REFUSED)
        except QuarryError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def cli(verbose: bool) -> None:
    """Quarry: select images with SQL, transform, upload and classify them with Celery pools."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@cli.command()
@one_line_errors
def config() -> None:
    """Print the settings in force (secrets censored)."""
    for name, value in get_settings().censored().items():
        click.echo(f"{name}={value}")


@cli.command()
@one_line_errors
def init() -> None:
    """Create the database (if missing), its tables and both buckets."""
    settings = get_settings()
    created = ensure_database(settings.database_url)
    with connect(settings.database_url, autocommit=True) as conn:
        ensure_schema(conn)
    store = ObjectStore(settings)
    for bucket in (settings.raw_bucket, settings.output_bucket):
        store.ensure_bucket(bucket)
    click.echo(
        f"database {'created' if created else 'ready'}; buckets "
        f"s3://{settings.raw_bucket} and s3://{settings.output_bucket} ready"
    )


@cli.command()
@click.argument("dataset_path", required=False, type=click.Path(path_type=Path))
@one_line_errors
def ingest(dataset_path: Path | None) -> None:
    """Load styles.csv into PostgreSQL and images/ into the raw bucket (re-runnable)."""
    settings = get_settings()
    dataset = dataset_path or settings.dataset_path
    store = ObjectStore(settings, max_connections=settings.ingest_concurrency)
    store.ensure_bucket(settings.output_bucket)
    with connect(settings.database_url, autocommit=True) as conn:
        ensure_schema(conn)
        s = run_ingest(conn, store, dataset, settings.raw_bucket, settings.ingest_concurrency, show_ingest)
    if sys.stderr.isatty():
        click.echo("", err=True)  # end the progress line
    click.echo(
        f"ingested {dataset}: {s.rows} rows loaded ({s.repaired} malformed lines repaired, "
        f"{s.rejected} rejected, {s.duplicate_ids} duplicate ids); images {s.uploaded} uploaded, "
        f"{s.present} already present, {s.missing} missing, {s.bad} bad, "
        f"{s.unrecognised_files} other files ignored; {s.seconds:.1f} s"
    )


def show_ingest(summary: IngestSummary) -> None:
    """One refreshed progress line on a terminal's stderr."""
    if sys.stderr.isatty():
        seconds = time.monotonic() - summary.started
        click.echo(
            f"\r{summary.images_seen} images read · {summary.uploaded} uploaded · "
            f"{summary.bad} bad · {summary.images_seen / seconds:.0f} img/s",
            err=True,
            nl=False,
        )


def model_reference(model: str | None, settings: Settings, store: ObjectStore) -> str | None:
    """Check a --model before the job starts; the reference workers will load."""
    if model is None:
        return None
    reference = settings.default_model if model == "default" else model
    path = locate_model(
        reference, MODELS_DIR, settings.model_cache_dir, lambda uri: store.get(*parse_s3_uri(uri))
    )
    Classifier(path, providers=["CPUExecutionProvider"])  # refuses missing or bad metadata
    return reference


def build_spec(settings: Settings, store: ObjectStore, options: dict[str, Any]) -> JobSpec:
    """Validate every job option; UserError before anything is recorded."""
    augment = parse_spec(options["augment"]) if options["augment"] else None
    keep_original = options["keep_original"] or bool(augment and augment.keep_original)
    if keep_original and options["variants"] < 2 and augment and augment.stages:
        raise UserError("--keep-original needs --variants 2 or more to leave room for an augmented one")
    return JobSpec(
        job_id=new_job_id(),
        variants=options["variants"],
        seed=options["seed"],
        augment=augment.stages if augment else [],
        keep_original=keep_original,
        image_format=options["image_format"],
        quality=options["quality"],
        model=model_reference(options["model"], settings, store),
        infer_on=options["infer_on"],
        top_k=options["top_k"],
        item_rows=options.get("item_rows") or settings.item_rows,
        output=options.get("output", "files"),
        key_layout=options.get("key_layout", "flat"),
    )


def job_chunk_size(spec: JobSpec, chunk_size: int | None, shard_size: int | None, settings: Settings) -> int:
    """Ids per chunk: a webdataset shard is one chunk, so --shard-size is its chunk size."""
    if spec.output == "files":
        if shard_size is not None:
            raise UserError("--shard-size applies to --output webdataset only")
        return chunk_size or settings.chunk_size
    if spec.key_layout != "flat":
        raise UserError("--key-layout applies to --output files only (shards are already few keys)")
    if chunk_size is not None and shard_size is not None and chunk_size != shard_size:
        raise UserError("--chunk-size and --shard-size disagree: a shard is one chunk; give one of them")
    return shard_size or chunk_size or DEFAULT_SHARD_SIZE


def augment_options(command: F) -> F:
    """The options that say how images are rendered (shared by `run` and `preview`)."""
    options = [
        click.option("--augment", "augment", metavar="SPEC", help="Pipeline text or YAML/JSON file."),
        click.option("--variants", default=1, show_default=True, type=click.IntRange(1, 64)),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1)),
        click.option(
            "--format",
            "image_format",
            type=click.Choice(["jpeg", "png", "webp"]),
            help="Output encoding (default: keep the source bytes when not augmented, else jpeg).",
        ),
        click.option("--quality", default=90, show_default=True, type=click.IntRange(1, 100)),
        click.option("--keep-original", is_flag=True, help="Variant 0 is the untouched original."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.option("--query", "sql", required=True, help="SELECT returning an `id` column.")
@click.option("--chunk-size", type=click.IntRange(1, 10_000), help="Ids per task [CHUNK_SIZE].")
@augment_options
@click.option("--model", help="Classify outputs: `default`, a NAME in models/, a PATH or s3:// URI.")
@click.option("--infer-on", type=click.Choice(["raw", "augmented"]), default="augmented", show_default=True)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--item-rows",
    type=click.Choice(["all", "failures"]),
    help="Rows in job_items for every item, or for failures only [ITEM_ROWS, default all].",
)
@click.option(
    "--output",
    type=click.Choice(["files", "webdataset"]),
    default="files",
    show_default=True,
    help="One object per item, or WebDataset tar shards with a manifest (one shard per chunk).",
)
@click.option(
    "--shard-size",
    type=click.IntRange(1, 10_000),
    help=f"webdataset: images per shard (the chunk size) [default {DEFAULT_SHARD_SIZE}].",
)
@click.option(
    "--key-layout",
    type=click.Choice(["flat", "hashed"]),
    default="flat",
    show_default=True,
    help="files: `hashed` spreads one job's keys over 256 prefixes.",
)
@click.option("--wait", is_flag=True, help="Follow the job until it ends; exit 1 if any item failed.")
@click.option("--wait-timeout", type=float, help="Stop following after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the job's counts as one JSON object, last.")
@one_line_errors
def run(
    sql: str,
    chunk_size: int | None,
    shard_size: int | None,
    wait: bool,
    wait_timeout: float | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Select images with SQL and record the job; the dispatcher sends it through the pools."""
    settings = get_settings()
    store = ObjectStore(settings)
    spec = build_spec(settings, store, options)
    chunk_size = job_chunk_size(spec, chunk_size, shard_size, settings)
    with connect(settings.database_url, autocommit=True) as conn:
        ensure_schema(conn)
        chunks, items = submit_job(
            conn,
            settings.database_url,
            sql,
            spec,
            chunk_size,
            settings.query_timeout_s,
        )
        progress = job_progress(conn, spec.job_id)
        assert progress is not None
        click.echo(f"job {spec.job_id}: {items} items in {chunks} chunks", err=True)
        if not wait:
            click.echo(json.dumps(progress.as_dict()) if as_json else spec.job_id)
            return
        progress = follow(conn, spec.job_id, timeout_s=wait_timeout)
    if as_json:
        click.echo(json.dumps(progress.as_dict()))
    else:
        click.echo(spec.job_id)
    sys.exit(0 if progress.finished and progress.failed == 0 else EXIT_FAILED_ITEMS)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def status(job_id: str, as_json: bool) -> None:
    """Counts of a running or finished job."""
    with connect(get_settings().database_url, autocommit=True) as conn:
        progress = job_progress(conn, checked_job_id(job_id))
    if progress is None:
        raise UserError(f"no job {job_id}")
    if as_json:
        click.echo(json.dumps(progress.as_dict()))
        return
    click.echo(
        f"job {job_id} ({progress.state}): {progress.done}/{progress.total} done, "
        f"{progress.failed} failed, {progress.in_flight} of {progress.chunks} chunks in flight, "
        f"{progress.seconds:.1f} s"
    )


@cli.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@one_line_errors
def jobs(limit: int, as_json: bool) -> None:
    """The newest jobs with their counts."""
    with connect(get_settings().database_url, autocommit=True) as conn:
        ensure_schema(conn)
        listed = list_jobs(conn, limit)
    if as_json:
        for progress in listed:
            click.echo(json.dumps({**progress.as_dict(), "created_at": progress.created_at}))
        return
    click.echo(f"{'job':36}  {'created':19}  {'state':9}  {'total':>10}  {'done':>10}  {'failed':>8}")
    for p in listed:
        click.echo(
            f"{p.job_id:36}  {p.created_at:19}  {p.state:9}  {p.total:>10}  {p.done:>10}  {p.failed:>8}"
        )


@cli.command()
@click.argument("job_id")
@one_line_errors
def cancel(job_id: str) -> None:
    """Stop a running job: nothing more is dispatched and the pools drop its messages."""
    with connect(get_settings().database_url, autocommit=True) as conn:
        stopped = cancel_job(conn, checked_job_id(job_id))
    click.echo(f"job {job_id}: {'cancelled' if stopped else 'not running, nothing to cancel'}")


@cli.command()
@click.argument("job_id")
@one_line_errors
def retry(job_id: str) -> None:
    """Run a finished (or cancelled) job's failed items again, once their cause is fixed."""
    with connect(get_settings().database_url, autocommit=True) as conn:
        chunks, items = retry_job(conn, checked_job_id(job_id))
    click.echo(f"job {job_id}: {items} failed items in {chunks} chunks sent again")


@cli.command()
@click.option("--ticks", type=click.IntRange(1), help="Stop after this many ticks (default: run forever).")
@one_line_errors
def dispatch(ticks: int | None) -> None:
    """Run the dispatcher: meter chunks into the transform queue and re-send lost ones."""
    from producer.dispatch import check_broker, run_dispatcher
    from workers.celery_app import app

    logging.getLogger().setLevel(logging.INFO)
    settings = get_settings()
    with connect(settings.database_url, autocommit=True) as conn:
        ensure_schema(conn)
    check_broker(app)
    run_dispatcher(app, settings, max_ticks=ticks)


@cli.command()
@click.argument("job_id")
@click.option(
    "--format", "file_format", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="File to write (parquet needs one; jsonl: stdout)."
)
@one_line_errors
def results(job_id: str, file_format: str, out: Path | None) -> None:
    """A job's item rows: id, variant, status, s3:// URI (shard#member for webdataset),
    label/score/top_k or error. With --item-rows failures, only the failed items have rows."""
    from producer.results import write_jsonl, write_parquet

    if file_format == "parquet" and out is None:
        raise UserError("--format parquet needs --out FILE")
    with connect(get_settings().database_url) as conn:
        if job_progress(conn, checked_job_id(job_id)) is None:
            raise UserError(f"no job {job_id}")
        conn.commit()
        rows = iter_results(conn, job_id)
        if file_format == "parquet":
            assert out is not None
            count = write_parquet(rows, out)
        elif out is None:
            count = write_jsonl(rows, sys.stdout)
        else:
            with out.open("w") as handle:
                count = write_jsonl(rows, handle)
    if out is not None:
        click.echo(f"wrote {count} rows to {out}", err=True)


@cli.command()
@click.option("--id", "image_id", required=True, type=int, help="Image id in DATASET_PATH.")
@augment_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@one_line_errors
def preview(image_id: int, out: Path, **options: Any) -> None:
    """Write a contact sheet of one image and its variants, as a job would render them."""
    settings = get_settings()
    spec = build_spec(
        settings, ObjectStore(settings), {**options, "model": None, "infer_on": "augmented", "top_k": 1}
    )
    write_preview(spec, image_id, settings.dataset_path, out)
    click.echo(f"wrote {out}")


def checked_job_id(job_id: str) -> str:
    """Refuse a job id that is not a UUID before asking the database."""
    try:
        return str(uuid.UUID(job_id))
    except ValueError as exc:
        raise UserError(f"not a job id: {job_id!r}") from exc


def main() -> None:
    """Entry point of the `producer` script."""
    try:
        cli()
    except ConfigError as exc:  # raised while reading settings, before a command wrapper runs
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
