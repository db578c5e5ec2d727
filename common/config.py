"""The one settings object, read once from the environment."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg.conninfo
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import ConfigError
from common.ledger import ItemRows
from common.paths import default_dataset_path, default_model_cache_dir

SECRET_FIELDS = frozenset(
    {
        "aws_secret_access_key",
        "query_role_password",
        "worker_role_password",
        "dispatcher_role_password",
        "scaler_role_password",
        "redis_password",
    }
)
MASK = "********"
# a password in a URL (scheme://user:PASSWORD@host) or a libpq key=value string (password=PASSWORD)
URL_PASSWORD = re.compile(r"(?P<head>://[^:/@\s]*:)[^@\s]+(?P<tail>@)|(?P<key>password\s*=\s*)('[^']*'|\S+)")
OPTIONAL_ROLE = r"^([a-z_][a-z0-9_]{0,62})?$"  # a PostgreSQL login's name, or empty
ENV_FILE = ".env"  # read by every process where it exists (`make up` writes the stack's secrets there)


class Settings(BaseSettings):
    """Every setting Quarry reads; each environment variable is the field name in upper case."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", env_file_encoding="utf-8")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/quarry"
    celery_broker_url: str = "redis://127.0.0.1:6379/0"
    redis_password: str = Field(
        default="", description="the broker's password, when CELERY_BROKER_URL does not carry one"
    )
    s3_endpoint_url: str | None = Field(
        default="http://127.0.0.1:9000", description="S3-compatible endpoint; empty: AWS S3 (boto3's default)"
    )
    aws_access_key_id: str = Field(default="", description="S3 key; empty: the AWS credential chain")
    aws_secret_access_key: str = Field(default="", description="its secret; empty with the key: the chain")
    aws_default_region: str = "us-east-1"
    raw_bucket: str = "quarry-raw"
    output_bucket: str = "quarry-output"
    source_buckets: str = Field(
        default="*",
        pattern=r"^(\*|[a-z0-9][a-z0-9.\-]*(,[a-z0-9][a-z0-9.\-]*)*)$",
        description="buckets a manifest or prefix may read images from: names, comma-separated;"
        " * any but OUTPUT_BUCKET",
    )
    dataset_path: Path = Field(default_factory=default_dataset_path)
    chunk_size: int = Field(default=100, ge=1, le=10_000, description="image ids per task message")
    query_timeout_s: int = Field(
        default=600, ge=1, description="statement timeout of user SQL: each slice or fetch of a selection"
    )
    selection_slice_ids: int = Field(
        default=250_000, ge=1, description="span of dataset ids a selection's slice covers (its memory)"
    )
    selection_connections: int = Field(
        default=4, ge=1, le=64, description="slices of a selection read at once, each on its own connection"
    )
    duplicates_connections: int = Field(
        default=4,
        ge=1,
        le=64,
        description="pages of `producer duplicates` searched at once, each on its own connection",
    )
    query_role: str = Field(
        default="quarry_reader",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="the PostgreSQL role (a login) that every piece of user SQL runs as",
    )
    query_role_password: str = Field(default="", description="its password; empty: none (trust auth)")
    worker_role: str = Field(
        default="quarry_worker",
        pattern=OPTIONAL_ROLE,
        description="the PostgreSQL login the pools connect as (producer init makes it); empty: the URL's",
    )
    worker_role_password: str = Field(default="", description="its password; empty: none (trust auth)")
    dispatcher_role: str = Field(
        default="quarry_dispatcher",
        pattern=OPTIONAL_ROLE,
        description="the PostgreSQL login the dispatcher connects as; empty: DATABASE_URL's",
    )
    dispatcher_role_password: str = Field(default="", description="its password; empty: none (trust auth)")
    scaler_role: str = Field(
        default="quarry_scaler",
        pattern=OPTIONAL_ROLE,
        description="a login that may read the backlog (jobs, job_chunks) and nothing else: KEDA's",
    )
    scaler_role_password: str = Field(default="", description="its password; empty: none (trust auth)")
    query_work_mem: str = Field(default="64MB", description="work_mem of user SQL (a slice's sort)")
    query_temp_file_limit: str = Field(
        default="50GB", description="temporary files one user query may write (where a large selection sorts)"
    )
    ingest_concurrency: int = Field(
        default=16, ge=1, le=256, description="threads reading a local folder's images while it is packed"
    )
    read_hole_bytes: int = Field(
        default=1024 * 1024, ge=0, description="ranges of one shard this close are read in one GET"
    )
    read_span_max_bytes: int = Field(
        default=16 * 1024 * 1024, ge=64 * 1024, description="the longest merged ranged GET (memory per read)"
    )
    read_whole_fraction: float = Field(
        default=0.95, gt=0, le=1, description="a shard this much covered is read whole (if under the span)"
    )
    read_ranges_in_flight: int = Field(
        default=4, ge=1, le=64, description="merged ranged GETs a process holds at once"
    )
    message_byte_budget: int = Field(
        default=4 * 1024 * 1024, ge=64 * 1024, description="largest transform→upload message, bytes"
    )
    transform_bytes_in_flight: int = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        description="raw image bytes a transform process holds, per chunk: a group rendered, the next read",
    )
    image_max_pixels: int = Field(
        default=100_000_000, ge=1, description="an image declaring more pixels fails alone, undecoded"
    )
    image_max_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=1024,
        description="an image object or member larger than this fails alone, unread",
    )
    manifest_line_max_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="a JSON Lines manifest line longer than this is a rejected line, unparsed",
    )
    row_group_max_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024 * 1024,
        description="a Parquet manifest's row group larger than this (uncompressed) is refused, unread",
    )
    default_model: str = Field(default="fashion-classifier", description="model NAME, PATH or s3:// URI")
    model_cache_dir: Path = Field(
        default_factory=default_model_cache_dir, description="s3:// models, kept by ETag (its user's alone)"
    )
    task_max_retries: int = Field(default=5, ge=0, description="retries of a transient task failure")
    dispatch_budget_chunks: int = Field(
        default=64, ge=1, description="chunks in flight at once, over every job (the dispatcher's budget)"
    )
    dispatch_interval_s: float = Field(default=0.5, gt=0, le=60, description="dispatcher tick")
    dispatch_busy_interval_s: float = Field(
        default=0.05, gt=0, le=60, description="dispatcher tick while chunks wait for room in the budget"
    )
    dispatch_metrics_port: int = Field(
        default=9808, ge=0, le=65535, description="the dispatcher's Prometheus /metrics port; 0: none"
    )
    dispatch_metrics_bind: str = Field(
        default="127.0.0.1",
        description="the address /metrics listens on; 0.0.0.0 where Prometheus scrapes from elsewhere",
    )
    metrics_min_interval_s: float = Field(
        default=15, ge=0, description="the ledger's gauges are read at most this often (Prometheus' interval)"
    )
    metrics_recent_s: int = Field(
        default=3600, ge=0, description="an ended job's gauges stay on /metrics this long after it ended"
    )
    dispatch_stall_s: int = Field(
        default=300, ge=5, description="a dispatcher whose loop stopped this long exits, to be restarted"
    )
    chunk_lease_s: int = Field(
        default=300,
        ge=5,
        description="a chunk no stage touched this long is dispatched again (last resort)",
    )
    worker_heartbeat_s: float = Field(
        default=5, gt=0, le=60, description="a worker process says it is alive this often (holders)"
    )
    holder_timeout_s: float = Field(
        default=15, gt=0, description="a worker process silent this long is lost: its chunks are sent again"
    )
    stall_warning_s: float = Field(
        default=60, gt=0, description="`--wait` and Job.wait: say so when no item ended for this long"
    )
    queue_quiet_s: float = Field(
        default=10,
        gt=0,
        description="an unheld chunk untouched this long, with nothing in the broker: lost",
    )
    chunk_max_attempts: int = Field(
        default=3, ge=1, le=100, description="dispatches of a chunk before its items are failed"
    )
    upload_backlog_messages: int = Field(
        default=16, ge=1, description="transform waits while the upload queue holds this many messages"
    )
    item_rows: ItemRows = Field(
        default="all", description="job_items rows: `all` items, or `failures` only (billion-scale jobs)"
    )
    broker_visibility_timeout_s: int | None = Field(
        default=None, ge=10, description="unacked task redelivered after this long; default 2 x lease"
    )
    require_gpu: bool = Field(
        default=False, description="an inference worker refuses to start unless onnxruntime runs on CUDA"
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _empty_endpoint_means_aws(cls, value: str | None) -> str | None:
        """`S3_ENDPOINT_URL=` (as a ConfigMap writes it) means AWS S3, not the URL ''."""
        return (value or "").strip() or None

    @property
    def source_rule(self) -> tuple[list[str], str | None]:
        """Where images may be read from: (the buckets named: RAW_BUCKET, Quarry's own shards,
        and those SOURCE_BUCKETS lists), and with `*` the one bucket refused among all others
        (OUTPUT_BUCKET, where other jobs' results are), else None: only the named ones."""
        if self.source_buckets == "*":
            return [self.raw_bucket], self.output_bucket
        return [self.raw_bucket, *self.source_buckets.split(",")], None

    def source_allowed(self, bucket: str) -> bool:
        """Whether images may be read from `bucket` (`source_rule`)."""
        named, all_but = self.source_rule
        return bucket in named or (all_but is not None and bucket != all_but)

    def refuse_source(self, uri: str) -> str | None:
        """Why an s3:// URI may not be read as a source (one line), or None."""
        bucket = uri[5:].split("/", 1)[0] if uri.startswith("s3://") else None
        if bucket is None or self.source_allowed(bucket):
            return None
        allowed = "any bucket but OUTPUT_BUCKET" if self.source_buckets == "*" else self.source_buckets
        return f"bucket {bucket} is not a source Quarry may read (SOURCE_BUCKETS: {allowed}): {uri}"

    @property
    def broker_url(self) -> str:
        """CELERY_BROKER_URL, with REDIS_PASSWORD in it where the URL carries none."""
        parts = urlsplit(self.celery_broker_url)
        if not self.redis_password or parts.password:
            return self.celery_broker_url
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"default:{quote(self.redis_password, safe='')}@{host}").geturl()

    @property
    def query_database_url(self) -> str:
        """DATABASE_URL as user SQL connects: logged in as QUERY_ROLE."""
        return login_url(self.database_url, self.query_role, self.query_role_password)

    @property
    def worker_database_url(self) -> str:
        """DATABASE_URL as the pools connect: logged in as WORKER_ROLE."""
        return login_url(self.database_url, self.worker_role, self.worker_role_password)

    @property
    def dispatcher_database_url(self) -> str:
        """DATABASE_URL as the dispatcher connects: logged in as DISPATCHER_ROLE."""
        return login_url(self.database_url, self.dispatcher_role, self.dispatcher_role_password)

    @property
    def visibility_timeout_s(self) -> int:
        """Redis redelivers unacked tasks only after the ledger would have re-dispatched them."""
        return self.broker_visibility_timeout_s or 2 * self.chunk_lease_s

    def censored(self) -> dict[str, str]:
        """Settings as strings, secrets replaced by asterisks."""
        shown = {}
        for name, value in self.model_dump().items():
            shown[name.upper()] = MASK if name in SECRET_FIELDS and value else mask_passwords(str(value))
        return shown


def mask_passwords(text: str) -> str:
    """`text` with every password of a URL or a key=value connection string in it masked."""

    def masked(match: re.Match[str]) -> str:
        if match.group("key"):
            return match.group("key") + MASK
        return match.group("head") + MASK + match.group("tail")

    return URL_PASSWORD.sub(masked, text)


def login_url(database_url: str, role: str, password: str) -> str:
    """`database_url` logged in as `role` with `password` (none when empty); unchanged when
    `role` is empty. The owner's password never reaches another role's URL."""
    if not role:
        return database_url
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    params.pop("password", None)
    params["user"] = role
    if password:
        params["password"] = password
    return psycopg.conninfo.make_conninfo("", **params)


def stage_time_limits(settings: Settings) -> tuple[int, int]:
    """(soft, hard) seconds a stage task may run. A stage still running when its chunk's lease
    runs out has lost the chunk to a new dispatch anyway: the soft limit ends it there (the
    failure is noted on the chunk like any other), and the hard limit kills its pool process a
    little later, where it is stuck beyond the reach of a signal."""
    return settings.chunk_lease_s, settings.chunk_lease_s + 30


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the environment once; a bad value raises ConfigError naming the variable."""
    try:
        return Settings(_env_file=os.environ.get("QUARRY_ENV_FILE", ENV_FILE) or None)  # type: ignore[call-arg]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise ConfigError(f"{name}: {first['msg']}") from exc
