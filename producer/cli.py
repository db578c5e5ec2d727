"""The `producer` command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from common.config import get_settings
from common.datasets import FORMATS
from common.db import wait_for_schema
from common.errors import ConfigError, QuarryError, UserError
from common.ingest.summary import IngestSummary
from quarry.client import DEFAULT_SHARD_SIZE, Quarry
from quarry.duplicates import DEFAULT_MODEL, DEFAULT_THRESHOLD
from quarry.progress import TerminalBar, render_ingest

EXIT_FAILED_ITEMS = 1
EXIT_REFUSED = 2
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
    quarry = Quarry.from_env()
    created = quarry.init()
    settings = quarry.settings
    click.echo(
        f"database {'created' if created else 'ready'}; buckets "
        f"s3://{settings.raw_bucket} and s3://{settings.output_bucket} ready"
    )


@cli.command()
@click.argument("source", required=False)
@click.option("--dataset", help="Its name, and its catalog table's [styles for the fashion archive].")
@click.option(
    "--id-column",
    help="The column naming each image: integers, or string keys (ids assigned); for a WebDataset, an"
    " integer column of its parquet tables (else ids are assigned).",
)
@click.option("--image-column", help="Manifests: the column of each image's s3://bucket/key.")
@click.option("--format", "source_format", type=click.Choice(FORMATS), help="Default: told by SOURCE.")
@click.option(
    "--column-type", "column_types", multiple=True, metavar="COL=TYPE", help="A column's PostgreSQL type."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@one_line_errors
def ingest(source: str | None, column_types: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Register a dataset: the fashion archive's folder [DATASET_PATH], a folder of {id}.jpg, a
    CSV/JSONL/Parquet manifest (file, s3:// object or prefix) of s3:// image URIs, or WebDataset
    tars (an s3:// prefix, or a local folder such as img2dataset's output). Images in s3:// stay
    where they are; a local folder of images is packed into shards, a local folder of shards is
    uploaded as it is."""
    quarry = Quarry.from_env()
    types = dict(parse_column_type(text) for text in column_types)
    line = TerminalBar(line=lambda progress: render_ingest(progress, quarry.registered_so_far(progress)))
    s = quarry.ingest(source, show_ingest, column_types=types, display=line, **options)
    if sys.stderr.isatty():
        click.echo("", err=True)  # end the progress line
    for problem in s.problems:
        click.echo(f"skipped: {problem}", err=True)
    if as_json:
        click.echo(json.dumps({k: v for k, v in asdict(s).items() if k != "started"}))
        sys.exit(EXIT_FAILED_ITEMS if s.units_failed else 0)
    click.echo(
        f"ingested {source or quarry.settings.dataset_path} as dataset {s.dataset}: {s.rows} rows"
        f" ({s.repaired} repaired, {s.rejected} rejected, {s.duplicate_ids} duplicate ids); images"
        f" {s.images} registered ({s.packed} packed into {s.shards} shards), {s.files_uploaded} files"
        f" uploaded, {s.present} already"
        f" registered, {s.missing} missing, {s.bad} bad, {s.unrecognised_files} other files ignored;"
        f" {s.problem_count} problems; {s.seconds:.1f} s"
        + (f"; ingest job {s.job_id}: {s.units_failed} units failed" if s.job_id else "")
    )
    if s.units_failed:
        sys.exit(EXIT_FAILED_ITEMS)


def parse_column_type(text: str) -> tuple[str, str]:
    column, _, type_name = text.partition("=")
    if not column or not type_name:
        raise UserError(f"--column-type {text!r}: give COLUMN=TYPE, e.g. score=real")
    return column.strip(), type_name.strip()


def show_ingest(summary: IngestSummary) -> None:
    """One refreshed progress line on a terminal's stderr."""
    if sys.stderr.isatty():
        seconds = time.monotonic() - summary.started
        click.echo(
            f"\r{summary.rows:,} rows · {summary.images:,} images registered"
            f" ({summary.images_seen / seconds:,.0f} img/s) · {summary.shards:,} shards · {summary.bad} bad"
            f" · {seconds:.1f} s",
            err=True,
            nl=False,
        )


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
        click.option(
            "--exact-decode",
            is_flag=True,
            help="Decode every image in full (default: JPEGs at 1/2-1/8 scale where the first resize"
            " or crop keeps twice its size).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.option("--query", "sql", required=True, help="SELECT returning an `id` column.")
@click.option("--dataset", help="The dataset the ids are of [the one whose table the query reads].")
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
def run(sql: str, wait: bool, wait_timeout: float | None, as_json: bool, **options: Any) -> None:
    """Select images with SQL and record the job; the dispatcher sends it through the pools."""
    job = Quarry.from_env().run(sql, **options)
    click.echo(f"job {job.id}: recording its selection ({job.status().slicing})", err=True)
    click.echo(f"job {job.id}: {job.spec().decoding()}", err=True)
    if not wait:
        progress = job.recorded()  # this process records the selection: it exits when that is done
        click.echo(f"job {job.id}: {progress.total} items in {progress.chunks} chunks", err=True)
        click.echo(json.dumps(progress.as_dict()) if as_json else job.id)
        return
    progress = job.wait(timeout=wait_timeout, display=TerminalBar())
    if progress.state == "failed":
        job.recorded()  # raises JobFailed: one line, exit 1
    click.echo(json.dumps(progress.as_dict()) if as_json else job.id)
    sys.exit(0 if progress.finished and progress.failed == 0 else EXIT_FAILED_ITEMS)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@one_line_errors
def datasets(as_json: bool) -> None:
    """The datasets: name, format, source, rows, images, shards, size and when registered."""
    listed = Quarry.from_env().list_datasets()
    if as_json:
        for info in listed:
            click.echo(json.dumps(info.as_dict()))
        return
    click.echo(
        f"{'name':20}  {'format':10}  {'rows':>11}  {'images':>11}  {'shards':>7}  {'size':>9}"
        f"  {'registered':19}  source"
    )
    for d in listed:
        size = "-" if d.size is None else human_bytes(d.size)
        registered = d.registered.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{d.name:20}  {d.format:10}  {d.rows:>11,}  {d.images:>11,}  {d.shards:>7,}  {size:>9}"
            f"  {registered:19}  {d.source or '-'}"
        )


def human_bytes(size: int) -> str:
    scaled, units = float(size), ["B", "KiB", "MiB", "GiB", "TiB"]
    while scaled >= 1024 and len(units) > 1:
        scaled, units = scaled / 1024, units[1:]
    return f"{size} B" if units[0] == "B" else f"{scaled:.1f} {units[0]}"


@cli.command("drop-dataset")
@click.argument("name")
@one_line_errors
def drop_dataset(name: str) -> None:
    """Remove dataset NAME: its catalog table, locations, and the shards and files Quarry wrote
    for it (images registered where they are stay); refused while a job on it runs."""
    deleted = Quarry.from_env().drop_dataset(name)
    click.echo(f"dataset {name} dropped ({deleted} objects Quarry wrote for it deleted)")


@cli.command()
@click.argument("dataset")
@click.option("--model", help=f"Whose embeddings: the NAME a job's --model was given [{DEFAULT_MODEL}].")
@click.option(
    "--threshold",
    type=float,
    help=f"Largest cosine distance between near-duplicates [{DEFAULT_THRESHOLD}].",
)
@click.option("--json", "as_json", is_flag=True, help='One {"group": G, "ids": [...]} object per line.')
@one_line_errors
def duplicates(dataset: str, model: str | None, threshold: float | None, as_json: bool) -> None:
    """Find DATASET's groups of near-duplicate images (altered copies of one photograph) from the
    embeddings a job with --model recorded; record them in the table `duplicates` and print them."""
    found = Quarry.from_env().duplicates(dataset, model, threshold)
    for group_id, ids in found.groups.items():
        if as_json:
            click.echo(json.dumps({"group": group_id, "ids": ids}))
        else:
            click.echo(f"group {group_id}: {' '.join(map(str, ids))}")
    if not as_json:
        grouped = sum(len(ids) for ids in found.groups.values())
        click.echo(
            f"{len(found.groups)} groups of near-duplicates ({grouped} of {found.images} images,"
            f" model {found.model}, threshold {found.threshold}): recorded in `duplicates`"
        )


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def status(job_id: str, as_json: bool) -> None:
    """Counts of a running or finished job."""
    progress = Quarry.from_env().job(job_id).status()
    if as_json:
        click.echo(json.dumps(progress.as_dict()))
        return
    click.echo(
        f"job {job_id} ({progress.state}): {progress.done}/{progress.total} done, "
        f"{progress.failed} failed, {progress.in_flight} of {progress.chunks} chunks in flight, "
        f"{progress.seconds:.1f} s" + (f"; {progress.error}" if progress.error else "")
    )


@cli.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@one_line_errors
def jobs(limit: int, as_json: bool) -> None:
    """The newest jobs with their counts."""
    listed = Quarry.from_env().list_jobs(limit)
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
    stopped = Quarry.from_env().job(job_id).cancel()
    click.echo(f"job {job_id}: {'cancelled' if stopped else 'not running, nothing to cancel'}")


@cli.command()
@click.argument("job_id")
@one_line_errors
def retry(job_id: str) -> None:
    """Run a finished (or cancelled) job's failed items again, once their cause is fixed."""
    chunks, items = Quarry.from_env().job(job_id).retry()
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
    wait_for_schema(settings.dispatcher_database_url)  # made by `producer init`, never by a service
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
    rows = Quarry.from_env().job(job_id).rows()
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
    Quarry.from_env().preview(image_id, **options).save(out)
    click.echo(f"wrote {out}")


def main() -> None:
    """Entry point of the `producer` script."""
    try:
        cli()
    except ConfigError as exc:  # raised while reading settings, before a command wrapper runs
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
