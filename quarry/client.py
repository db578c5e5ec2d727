"""Quarry's Python API: what the CLI and notebooks call. Every method raises from Quarry's error
tree (`common.errors`) with one clear message; a refused job records nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import psycopg

from common.config import Settings, get_settings
from common.datasets import FASHION, default_dataset, get_dataset, lookup_catalog
from common.db import Database, connect, ensure_database, ensure_schema
from common.errors import NoSuchJob, UserError
from common.ingest.summary import IngestSummary
from common.jobs import JobProgress, cancel_job, iter_results, job_progress, job_spec, list_jobs, retry_job
from common.jobspec import JobSpec
from common.roles import ensure_roles, grant_dataset
from quarry.datasets import DatasetInfo, drop_dataset, list_datasets
from quarry.duplicates import DEFAULT_MODEL, DEFAULT_THRESHOLD, DuplicateGroups, find_duplicates
from quarry.progress import Display, follow
from quarry.query import check_query, run_user_query
from quarry.record import Recording
from quarry.slicing import parse_tree, relations
from quarry.submit import new_job_id, start_job

if TYPE_CHECKING:
    import pandas as pd

    from common.storage import ObjectStore
# NumPy, OpenCV, boto3 and onnxruntime load where a method needs them: `producer run` reaches its
# first chunk sooner without them (they were 0.6 of its 1.2 s start-up on 2 cores)

DEFAULT_SHARD_SIZE = 1000  # images per webdataset shard (img2dataset writes 10,000)
R = TypeVar("R")
SQL_ROW_LIMIT = 100_000  # `Quarry.sql` returns at most this many rows unless told otherwise


class Preview:
    """A contact sheet of one image and its variants; shows itself inline in Jupyter."""

    def __init__(self, image_id: int, sheet: Any) -> None:
        self.image_id = image_id
        self.pixels = sheet  # BGR uint8, as OpenCV holds it
        from common.images import encode

        self.png = encode(sheet, "png", 0)

    def _repr_png_(self) -> bytes:
        return self.png

    def save(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.png)
        return Path(path)


class Job:
    """One job of the ledger, by id. Cheap to create: every call reads PostgreSQL afresh."""

    def __init__(self, quarry: Quarry, job_id: str, recording: Recording | None = None) -> None:
        self.quarry = quarry
        self.id = job_id
        self.recording = recording  # while this process records the job's selection

    def recorded(self, timeout: float | None = None) -> JobProgress:
        """Wait until the whole selection is recorded (the job runs meanwhile); its counts then.
        JobFailed when the query failed halfway."""
        if self.recording is not None:
            self.recording.wait(timeout)
        return self.status()

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def spec(self) -> JobSpec:
        """What the job asks for, as stored with it (augment stages, model, decode floor, ...)."""
        self.status()
        with self.quarry.connection() as conn:
            return JobSpec.from_message(job_spec(conn, self.id))

    def status(self) -> JobProgress:
        """Counts, state and seconds; NoSuchJob if the id is not a job."""
        with self.quarry.connection() as conn:
            progress = job_progress(conn, self.id)
        if progress is None:
            raise NoSuchJob(f"no job {self.id}")
        return progress

    def wait(
        self, progress: bool = True, timeout: float | None = None, display: Display | None = None
    ) -> JobProgress:
        """Follow the job until it finishes or is cancelled (or `timeout` seconds pass), with a
        progress bar: a notebook widget in Jupyter, text in a terminal."""
        with self.quarry.connection() as conn:
            return follow(
                conn,
                self.id,
                display or (ProgressBar() if progress else Silent()),
                timeout_s=timeout,
                stall_warning_s=self.quarry.settings.stall_warning_s,
            )

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every item row (id, variant, status, uri, label/score/top_k or error), streamed."""
        self.status()
        with self.quarry.connection(autocommit=False) as conn:
            yield from iter_results(conn, self.id)

    def results(self, catalog: bool = False) -> pd.DataFrame:
        """The item rows as a DataFrame; `catalog=True` joins each row with its dataset's catalog
        row (the columns of `styles` for the fashion archive); a catalog column named like an item
        column (img2dataset's `status`, `error`) gets the suffix `_catalog`."""
        import pandas as pd

        frame = pd.DataFrame(
            self.rows(), columns=["image_id", "variant", "status", "uri", "error", "label", "score", "top_k"]
        )
        if catalog and not frame.empty:
            with self.quarry.connection() as conn:  # Quarry's own query: the owner's connection
                dataset = job_spec(conn, self.id).get("dataset", FASHION)
                found = lookup_catalog(conn, dataset, [int(i) for i in frame["image_id"].unique()])
            rows = pd.DataFrame([{"image_id": i, **fields} for i, fields in found.items()])
            if not rows.empty:
                frame = frame.merge(rows, on="image_id", how="left", suffixes=("", "_catalog"))
        return frame

    def failures(self) -> pd.DataFrame:
        """The failed items with their errors."""
        frame = self.results()
        return frame[frame["status"] == "failed"][["image_id", "variant", "error"]].reset_index(drop=True)

    def retry(self) -> tuple[int, int]:
        """Send the failed items again; (chunks, items) sent."""
        return self.quarry.ledger(retry_job, self.id)

    def cancel(self) -> bool:
        """Stop dispatching the job; False when it was not running."""
        return self.quarry.ledger(cancel_job, self.id)


@dataclass(frozen=True)
class CheckedModel:
    """A job's model as the producer checked it."""

    reference: str  # what workers load: a path, a name under models/, or s3://
    digest: str  # sha256 of its bytes
    dimensions: int | None  # its embedding output's length; None: it declares none


class Quarry:
    """A handle on one deployment: its PostgreSQL, S3 and settings (see `common/config.py`)."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings or get_settings()
        self.settings = base.model_copy(update=overrides) if overrides else base
        self._ready = False  # the schema and the query role were checked

    @classmethod
    def from_env(cls) -> Quarry:
        """Settings from the environment, as the CLI and workers read them."""
        return cls(get_settings())

    def connection(self, autocommit: bool = True) -> Any:
        return connect(self.settings.database_url, autocommit=autocommit)

    def ledger(self, function: Callable[..., R], *args: Any) -> R:
        """A ledger transaction `function(conn, *args)`, run again after a lock conflict or a
        dropped connection (for up to 30 s), on a connection of its own."""
        database = Database(self.settings.database_url)
        try:
            return database.run(function, *args)
        finally:
            database.close()

    def store(self, max_connections: int = 10) -> ObjectStore:
        from common.storage import ObjectStore

        return ObjectStore(self.settings, max_connections=max_connections)

    def init(self) -> bool:
        """Create the database if missing, its tables and both buckets; True if it was created."""
        created = ensure_database(self.settings.database_url)
        with self.connection() as conn:
            ensure_schema(conn, self.settings.raw_bucket)
            ensure_roles(conn, self.settings, maintain=True)
        store = self.store()
        for bucket in (self.settings.raw_bucket, self.settings.output_bucket):
            store.ensure_bucket(bucket)
        return created

    def ingest(
        self,
        source: str | Path | None = None,
        on_progress: Callable[[IngestSummary], None] = lambda s: None,
        *,
        dataset: str | None = None,
        id_column: str | None = None,
        image_column: str | None = None,
        source_format: str | None = None,
        column_types: dict[str, str] | None = None,
        progress: bool = True,
        display: Display | None = None,
    ) -> IngestSummary:
        """Register a dataset (default: DATASET_PATH, the fashion archive): a Kaggle-layout folder,
        a folder of images (both packed here), a CSV/JSON Lines/Parquet manifest of s3:// image
        URIs, or an s3:// prefix of WebDataset shards (both registered by the transform pool, as
        an ingest job followed to its end, with a progress bar unless `progress=False`).
        Re-runnable; see docs/datasets.md."""
        from quarry.ingest import IngestRequest  # Arrow and the ingest code load when ingesting
        from quarry.ingest import ingest as run_ingest

        request = IngestRequest(
            str(source if source is not None else self.settings.dataset_path),
            dataset,
            id_column,
            image_column,
            source_format,
            dict(column_types or {}),
        )
        store = self.store(max_connections=self.settings.ingest_concurrency)
        store.ensure_bucket(self.settings.output_bucket)
        with self.connection() as conn:
            self.ensure_ready(conn)
            summary = run_ingest(
                conn,
                store,
                request,
                self.settings.raw_bucket,
                self.settings.ingest_concurrency,
                on_progress,
                lambda job_id: Job(self, job_id).wait(progress, display=display or self.ingest_bar(progress)),
            )
            grant_dataset(conn, self.settings, summary.dataset)
            return summary

    def list_datasets(self) -> list[DatasetInfo]:
        """Every dataset with its format, source, rows, images, shards, size and when registered."""
        with self.connection() as conn:
            self.ensure_ready(conn)
            return list_datasets(conn)

    def datasets(self) -> pd.DataFrame:
        """`list_datasets()` as a DataFrame, one row per dataset."""
        import pandas as pd

        columns = [f.name for f in fields(DatasetInfo)]
        return pd.DataFrame([info.as_dict() for info in self.list_datasets()], columns=columns)

    def drop_dataset(self, name: str) -> int:
        """Remove a dataset: its catalog table, locations, and the shards and files Quarry wrote
        for it (sources registered where they are stay); UserError while a job on it runs. How
        many objects were deleted."""
        with self.connection() as conn:
            self.ensure_ready(conn)
            return drop_dataset(conn, self.store(), name, self.settings)

    def duplicates(
        self, dataset: str, model: str | None = None, threshold: float | None = None
    ) -> DuplicateGroups:
        """Group `dataset`'s near-duplicate images by the embeddings a job with `model` recorded
        (default: the shipped copy-detection model), record the groups in `duplicates` (readable
        by user SQL) and return them (quarry/duplicates.py)."""
        with self.connection() as conn:
            self.ensure_ready(conn)
            return find_duplicates(
                conn,
                self.settings,
                dataset,
                model or DEFAULT_MODEL,
                DEFAULT_THRESHOLD if threshold is None else threshold,
            )

    def registered_so_far(self, progress: JobProgress) -> dict[str, int]:
        """Rows, images and shards an ingest job has registered so far (its finished units)."""
        from common.ingest.units import registered_so_far

        with self.connection() as conn:
            return registered_so_far(conn, progress.job_id)

    def ingest_bar(self, progress: bool) -> Display:
        return ProgressBar("unit", self.registered_so_far) if progress else Silent()

    def run(
        self,
        query: str,
        *,
        augment: str | None = None,
        variants: int = 1,
        seed: int = 0,
        image_format: str | None = None,
        quality: int = 90,
        keep_original: bool = False,
        model: str | None = None,
        infer_on: Literal["raw", "augmented"] = "augmented",
        top_k: int = 5,
        item_rows: Literal["all", "failures"] | None = None,
        output: Literal["files", "webdataset"] = "files",
        shard_size: int | None = None,
        chunk_size: int | None = None,
        key_layout: Literal["flat", "hashed"] = "flat",
        dataset: str | None = None,
        exact_decode: bool = False,
    ) -> Job:
        """Select images of `dataset` (default: the only one ingested) with SQL and record the
        job; the dispatcher sends its chunks through the pools as they are recorded. Every option
        is checked before anything is recorded. Returns once the first chunks are in the ledger;
        the rest of the selection is recorded on threads of this process (`Job.recorded()`
        waits for it; the job's state is `recording` until then). JPEGs are decoded no larger
        than the spec's first resize or crop needs (`spec.decode_floor`); `exact_decode=True`
        decodes every image in full."""
        spec = self.job_spec(
            augment=augment,
            variants=variants,
            seed=seed,
            image_format=image_format,
            quality=quality,
            keep_original=keep_original,
            model=model,
            infer_on=infer_on,
            top_k=top_k,
            item_rows=item_rows,
            output=output,
            key_layout=key_layout,
            exact_decode=exact_decode,
        )
        size = job_chunk_size(spec, chunk_size, shard_size, self.settings)
        with self.connection() as conn:
            self.ensure_ready(conn)
            body = check_query(query)  # a refused query is said before anything else
            named = dataset or default_dataset(conn, set(relations(parse_tree(body))))
            spec = replace(spec, dataset=get_dataset(conn, named).name)
            spec = replace(spec, embedding_set=self.embedding_set(conn, spec))
            recording = start_job(conn, self.settings, query, spec, size)
        return Job(self, spec.job_id, recording)

    def job_spec(self, **options: Any) -> JobSpec:
        """A validated JobSpec (UserError for a bad option) with a new job id."""
        check_range("variants", options["variants"], 1, 64)
        check_range("quality", options["quality"], 1, 100)
        check_range("top_k", options["top_k"], 1, 100)
        check_choice("infer_on", options["infer_on"], ("raw", "augmented"))
        check_choice("output", options["output"], ("files", "webdataset"))
        check_choice("key_layout", options["key_layout"], ("flat", "hashed"))
        check_choice("image_format", options["image_format"], (None, "jpeg", "png", "webp"))
        from common.augment import parse_spec
        from common.augment.sizing import spec_floor

        augment = parse_spec(options["augment"]) if options["augment"] else None
        keep_original = options["keep_original"] or bool(augment and augment.keep_original)
        if keep_original and options["variants"] < 2 and augment and augment.stages:
            raise UserError("keep_original needs 2 or more variants to leave room for an augmented one")
        model = self.checked_model(options["model"])
        return JobSpec(
            job_id=new_job_id(),
            variants=options["variants"],
            seed=options["seed"],
            augment=augment.stages if augment else [],
            keep_original=keep_original,
            image_format=options["image_format"],
            quality=options["quality"],
            model=model.reference if model else None,
            model_name=options["model"] if model else None,
            model_digest=model.digest if model else None,
            embedding_dimensions=model.dimensions if model else None,
            infer_on=options["infer_on"],
            top_k=options["top_k"],
            item_rows=options["item_rows"] or self.settings.item_rows,
            output=options["output"],
            key_layout=options["key_layout"],
            exact_decode=options["exact_decode"],
            decode_floor=spec_floor(augment.stages if augment else [], options["exact_decode"]),
        )

    def checked_model(self, model: str | None) -> CheckedModel | None:
        """Check a model before the job starts: the reference workers will load, its bytes'
        digest and its embedding output's length."""
        if model is None:
            return None
        reference = self.settings.default_model if model == "default" else model
        from common.model import Classifier, locate_model
        from common.paths import MODELS_DIR

        path = locate_model(  # the S3 client only for a model in S3 (making one costs 0.12 s)
            reference, MODELS_DIR, self.settings.model_cache_dir, self.store
        )
        classifier = Classifier(path, providers=["CPUExecutionProvider"])  # refuses bad metadata
        return CheckedModel(reference, classifier.digest, classifier.info.dimensions)

    def embedding_set(self, conn: psycopg.Connection, spec: JobSpec) -> int | None:
        """Where a job whose model has an embedding output records it (ConfigError, one line,
        where this PostgreSQL has no pgvector); None for other jobs."""
        if spec.model_name is None or spec.model_digest is None or spec.embedding_dimensions is None:
            return None
        from common.embeddings import ensure_set

        digest = bytes.fromhex(spec.model_digest)
        return ensure_set(
            conn, self.settings, spec.dataset, spec.model_name, digest, spec.embedding_dimensions
        ).id

    def job(self, job_id: str) -> Job:
        """A job by id; NoSuchJob when there is none."""
        job = Job(self, checked_job_id(job_id))
        job.status()
        return job

    def list_jobs(self, limit: int = 20) -> list[JobProgress]:
        with self.connection() as conn:
            ensure_schema(conn, self.settings.raw_bucket)
            return list_jobs(conn, limit)

    def jobs(self, limit: int = 20) -> pd.DataFrame:
        """The newest jobs with their counts, newest first."""
        import pandas as pd

        return pd.DataFrame(
            [{**p.as_dict(), "created_at": p.created_at} for p in self.list_jobs(limit)],
            columns=["job_id", "state", "total", "done", "failed", "seconds", "created_at"],
        )

    def preview(
        self,
        image_id: int,
        *,
        augment: str | None = None,
        variants: int = 1,
        seed: int = 0,
        image_format: str | None = None,
        quality: int = 90,
        keep_original: bool = False,
        exact_decode: bool = False,
    ) -> Preview:
        """The image and its variants exactly as a job with these options renders them."""
        spec = self.job_spec(
            augment=augment,
            variants=variants,
            seed=seed,
            image_format=image_format,
            quality=quality,
            keep_original=keep_original,
            model=None,
            infer_on="augmented",
            top_k=1,
            item_rows=None,
            output="files",
            key_layout="flat",
            exact_decode=exact_decode,
        )
        from quarry.preview import contact_sheet, read_dataset_image

        data = read_dataset_image(self.settings.dataset_path, image_id)
        return Preview(image_id, contact_sheet(spec, image_id, data, self.settings.image_max_pixels))

    def similar(
        self, dataset: str, image_id: int, k: int = 10, *, where: str | None = None, model: str = "default"
    ) -> str:
        """The SQL of the `k` images of `dataset` most like `image_id` under `model` (its
        embeddings, recorded by a job with that model; cosine distance, nearest first), among
        those matching `where` (a condition on the dataset's columns, which the query names `s`):
        columns `id` and `distance`. Pass it to `sql()` to read them, or to `run()` to render them."""
        check_range("k", k, 1, 10_000)
        from common.embeddings import similar_query

        with self.connection() as conn:
            self.ensure_ready(conn)
            found = get_dataset(conn, dataset)
            query = similar_query(conn, found.name, found.id_column, image_id, k, model, where)
        check_query(query)  # `where` is user SQL: one plain SELECT, or refused here in one line
        return query

    def sql(self, query: str, limit: int | None = SQL_ROW_LIMIT) -> pd.DataFrame:
        """A read-only query on the catalog as a DataFrame of at most `limit` rows, with the same
        guard as `run`: one plain query, run as the query role, READ ONLY, QUERY_TIMEOUT_S."""
        import pandas as pd

        check_query(query)  # refused before any connection is made
        with self.connection() as conn:
            self.ensure_ready(conn)
        columns, rows = run_user_query(self.settings, query, limit)
        return pd.DataFrame(rows, columns=columns)

    def ensure_ready(self, conn: psycopg.Connection) -> None:
        """Quarry's tables and the query role, once per Quarry object."""
        if not self._ready:
            ensure_schema(conn, self.settings.raw_bucket)
            ensure_roles(conn, self.settings)
            self._ready = True


def job_chunk_size(spec: JobSpec, chunk_size: int | None, shard_size: int | None, settings: Settings) -> int:
    """Ids per chunk: a webdataset shard is one chunk, so a shard size is its chunk size."""
    if spec.output == "files":
        if shard_size is not None:
            raise UserError("--shard-size applies to --output webdataset only")
        return chunk_size or settings.chunk_size
    if spec.key_layout != "flat":
        raise UserError("--key-layout applies to --output files only (shards are already few keys)")
    if chunk_size is not None and shard_size is not None and chunk_size != shard_size:
        raise UserError("--chunk-size and --shard-size disagree: a shard is one chunk; give one of them")
    return shard_size or chunk_size or DEFAULT_SHARD_SIZE


def checked_job_id(job_id: str) -> str:
    """A job id must be a UUID; UserError names the bad value."""
    import uuid

    try:
        return str(uuid.UUID(job_id))
    except (ValueError, AttributeError, TypeError) as exc:
        raise UserError(f"not a job id: {job_id!r}") from exc


def check_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{name} must be an integer from {low} to {high}, not {value!r}")


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}")


class Silent:
    def update(self, progress: JobProgress) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def close(self, progress: JobProgress) -> None:
        pass


class ProgressBar:
    """tqdm.auto: a widget in Jupyter, text in a terminal; counts finished items (images, or an
    ingest's units), with `extra(progress)`'s counts beside them."""

    def __init__(
        self, unit: str = "img", extra: Callable[[JobProgress], dict[str, int]] = lambda progress: {}
    ) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=0, unit=unit, desc="job")
        self.extra = extra

    def update(self, progress: JobProgress) -> None:
        self.bar.total = progress.total  # grows while the selection is recorded
        self.bar.n = progress.done + progress.failed
        self.bar.set_description(progress.state, refresh=False)
        self.bar.set_postfix(failed=progress.failed, **self.extra(progress), refresh=False)
        self.bar.refresh()

    def warn(self, message: str) -> None:
        self.bar.write(message)

    def close(self, progress: JobProgress) -> None:
        self.update(progress)
        self.bar.close()
