"""S3-compatible object storage: the only module that talks to boto3 and obstore.

An image's GET and an output's PUT go through obstore (Rust's object_store): it spends 0.17-0.32
ms of CPU per request where boto3 spends 1.0-1.9 ms (bench.peers), which on a node the S3 server
shares decides the rate (docs/decisions.md, "Against the peers"). Everything else (listing, HEAD, deletes,
multipart uploads of local files, buckets) stays with boto3.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

import boto3
import boto3.exceptions
import obstore
import obstore.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError
from obstore.auth.boto3 import Boto3CredentialProvider
from obstore.store import S3Store

from common.coalesce import Read, ReadPolicy, plan_reads
from common.config import Settings
from common.errors import (
    ImageTooLarge,
    ObjectMissing,
    QuarryError,
    SourceChanged,
    SourceRefused,
    StorageError,
    StorageUnavailable,
)
from common.sources import Source

if TYPE_CHECKING:
    from obstore import GetOptions

# obstore raises its own errors, and Python's FileNotFoundError for a missing object
OBSTORE_ERRORS = (obstore.exceptions.BaseError, OSError)
DENIED = obstore.exceptions.PermissionDeniedError | obstore.exceptions.UnauthenticatedError
CLIENT_STATUS = re.compile(r"status code: (4\d\d)")
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500"}
)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into bucket and key."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise StorageError(f"not an s3://bucket/key URI: {uri!r}")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


class ObjectStore:
    """Buckets and objects on one S3 endpoint; errors translated to Quarry's tree."""

    def __init__(self, settings: Settings, *, max_connections: int = 10) -> None:
        self.settings = settings
        self.endpoint = settings.s3_endpoint_url or "AWS S3"
        self.max_connections = max_connections
        self._client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            **credentials(settings),
            region_name=settings.aws_default_region,
            config=Config(
                max_pool_connections=max_connections,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        self._buckets: dict[str, S3Store] = {}
        self._buckets_lock = threading.Lock()

    def _bucket(self, bucket: str) -> S3Store:
        """obstore's client for one bucket (made once; obstore's stores are per bucket and safe
        to share between threads)."""
        with self._buckets_lock:
            if bucket not in self._buckets:
                self._buckets[bucket] = object_store(self.settings, bucket)
            return self._buckets[bucket]

    def ensure_bucket(self, bucket: str) -> None:
        """Create the bucket when it does not exist."""
        try:
            self._client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if _code(exc) not in MISSING_CODES | {"NoSuchBucket"}:
                raise self._translate(exc, f"s3://{bucket}") from exc
        except (BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}") from exc
        try:
            self._client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if _code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise self._translate(exc, f"s3://{bucket}") from exc

    def put(
        self, bucket: str, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        """Store an object (overwriting: keys are deterministic, so a rerun writes the same); in
        one request whatever its size (a shard, an output), as S3 allows up to 5 GiB."""
        try:
            obstore.put(
                self._bucket(bucket),
                key,
                data,
                attributes={"Content-Type": content_type, **metadata},
                use_multipart=False,
            )
        except FileNotFoundError as exc:  # what S3 answers a PUT into a bucket that is not there
            raise StorageError(f"s3://{bucket}/{key}: S3 has no bucket {bucket!r}") from exc
        except OBSTORE_ERRORS as exc:
            raise self._translate_obstore(exc, f"s3://{bucket}/{key}") from exc

    def delete(self, bucket: str, key: str) -> None:
        """Remove an object (S3 answers the same whether or not it existed)."""
        try:
            self._client.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}/{key}") from exc

    def get(self, bucket: str, key: str) -> bytes:
        """An object's bytes; ObjectMissing when there is none."""
        try:
            return bytes(obstore.get(self._bucket(bucket), key).bytes())
        except OBSTORE_ERRORS as exc:
            raise self._translate_obstore(exc, f"s3://{bucket}/{key}") from exc

    def read(self, source: Source) -> tuple[bytes, str]:
        """An image's bytes and the ETag of the object holding them: the whole object, or the
        member's byte range; errors as `fetch` raises them."""
        if refusal := self.refused(source):
            raise refusal
        read = Read(source.uri, source.etag, source.offset, source.length, [source])
        data, etag = self.fetch(read)
        return read.slice_of(data, source), etag

    def fetch(self, read: Read) -> tuple[bytes | memoryview, str]:
        """One GET: the object, or its range. A pinned ETag is sent as If-Match: SourceChanged
        when the object was rewritten since, ObjectMissing when it is gone. An object of unknown
        size is refused past IMAGE_MAX_BYTES by its response's header, before its body is read."""
        bucket, key = parse_s3_uri(read.uri)
        options: GetOptions = {}
        if read.start is not None and read.length is not None:
            options["range"] = (read.start, read.start + read.length)
        if read.etag:
            options["if_match"] = read.etag
        try:
            response = obstore.get(self._bucket(bucket), key, options=options)
            etag = str(response.meta.get("e_tag") or "")
            if len(read.sources) > 1 and read.length is not None:  # a merged range: sliced, not copied
                return memoryview(response.bytes()), etag
            start, end = response.range
            if end - start > self.settings.image_max_bytes:  # an image's own object or member
                raise self.refuse_size(read.uri, end - start)
            return bytes(response.bytes()), etag
        except obstore.exceptions.PreconditionError as exc:
            raise SourceChanged(f"source changed since it was registered: {read.uri}") from exc
        except OBSTORE_ERRORS as exc:
            error = self._translate_obstore(exc, read.uri)
            if isinstance(error, ObjectMissing):
                raise ObjectMissing(f"source vanished: {read.uri}") from exc
            raise error from exc

    def read_many(
        self, sources: Sequence[Source], own: str = ""
    ) -> dict[Source, tuple[bytes, str] | QuarryError]:
        """Many sources in few GETs (common/coalesce.py: ranges of one shard merged, at most
        READ_RANGES_IN_FLIGHT merged reads held at once; whole objects concurrently); each
        source maps to its (bytes, ETag) or the error its read raised (`refused`: `own` is a URI
        prefix read whatever SOURCE_BUCKETS says)."""
        policy = ReadPolicy(
            self.settings.read_hole_bytes,
            self.settings.read_span_max_bytes,
            self.settings.read_whole_fraction,
        )
        got: dict[Source, tuple[bytes, str] | QuarryError] = {}
        for source in sources:
            if refusal := self.refused(source, own):
                got[source] = refusal
        sources = [source for source in sources if source not in got]
        sizes = {s.uri: s.object_size for s in sources if s.object_size is not None}
        reads = plan_reads(sources, policy, sizes)

        def fetch(read: Read) -> tuple[bytes | memoryview, str] | QuarryError:
            try:
                return self.fetch(read)
            except QuarryError as exc:
                return exc

        merged = [read for read in reads if len(read.sources) > 1]
        single = [read for read in reads if len(read.sources) == 1]
        # merged reads a few at a time, each sliced and let go before the next few are fetched
        in_flight = self.settings.read_ranges_in_flight
        batches = [(self._range_pool, merged[i : i + in_flight]) for i in range(0, len(merged), in_flight)]
        for pool, batch in [*batches, (self._pool, single)]:
            for read, result in zip(batch, pool.map(fetch, batch), strict=True):
                for source in read.sources:
                    got[source] = (
                        result
                        if isinstance(result, QuarryError)
                        else (read.slice_of(result[0], source), result[1])
                    )
        return got

    def refused(self, source: Source, own: str = "") -> QuarryError | None:
        """Why a source is not read at all: its bucket is not one images may come from
        (SOURCE_BUCKETS) and it is not under `own` (a job's own outputs, which inference reads),
        or its known size is past IMAGE_MAX_BYTES; None to read it."""
        if not (own and source.uri.startswith(own)) and (why := self.settings.refuse_source(source.uri)):
            return SourceRefused(why)
        return self.too_large(source)

    def too_large(self, source: Source) -> ImageTooLarge | None:
        """The refusal of a source whose known size (a member's length, an object's recorded
        size) is past IMAGE_MAX_BYTES; None otherwise (an object of unknown size is checked by
        the Content-Length of its GET, before its body is read)."""
        size = source.length if source.length is not None else source.object_size
        if size is not None and size > self.settings.image_max_bytes:
            return self.refuse_size(source.locator, size)
        return None

    def refuse_size(self, where: str, size: int) -> ImageTooLarge:
        return ImageTooLarge(
            f"image too large: {where} is {size:,} bytes (IMAGE_MAX_BYTES is"
            f" {self.settings.image_max_bytes:,}; not read)"
        )

    def head(self, bucket: str, key: str) -> tuple[int, str]:
        """An object's size and ETag; ObjectMissing when there is none."""
        try:
            response = self._client.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}/{key}") from exc
        return int(response["ContentLength"]), str(response["ETag"])

    def metadata(self, bucket: str, key: str) -> dict[str, str] | None:
        """An object's user metadata (x-amz-meta-*); None when there is no such object."""
        try:
            return dict(self._client.head_object(Bucket=bucket, Key=key)["Metadata"])
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            error = self._translate(exc, f"s3://{bucket}/{key}")
            if isinstance(error, ObjectMissing):
                return None
            raise error from exc

    def upload_file(
        self,
        path: str,
        bucket: str,
        key: str,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store a local file, in parts when large (boto3's managed transfer)."""
        extra = {"ContentType": content_type, "Metadata": dict(metadata or {})}
        try:
            self._client.upload_file(path, bucket, key, ExtraArgs=extra)
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}/{key}") from exc
        except boto3.exceptions.S3UploadFailedError as exc:
            raise StorageUnavailable(f"s3://{bucket}/{key}: upload failed: {exc}") from exc

    def open(self, uri: str) -> Any:
        """A streaming body of a whole object (read it in order, once)."""
        bucket, key = parse_s3_uri(uri)
        try:
            return self._client.get_object(Bucket=bucket, Key=key)["Body"]
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, uri) from exc

    def list_objects(self, uri_prefix: str) -> Iterator[tuple[str, int, str]]:
        """(s3:// URI, size, ETag) of every object under `s3://bucket/prefix`, in key order."""
        if not uri_prefix.startswith("s3://"):
            raise StorageError(f"not an s3:// prefix: {uri_prefix!r}")
        bucket, _, prefix = uri_prefix[5:].partition("/")
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield f"s3://{bucket}/{item['Key']}", int(item["Size"]), str(item["ETag"])
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, uri_prefix) from exc

    @cached_property
    def arrow(self) -> Any:
        """The same endpoint and credentials for Arrow (a `pyarrow.fs.S3FileSystem`), which reads a
        Parquet file's footer and row groups by ranged GETs (paths are `bucket/key`)."""
        import pyarrow.fs

        endpoint = self.settings.s3_endpoint_url
        keys = credentials(self.settings)
        return pyarrow.fs.S3FileSystem(
            access_key=keys.get("aws_access_key_id"),
            secret_key=keys.get("aws_secret_access_key"),
            region=self.settings.aws_default_region,
            endpoint_override=endpoint,
            scheme="https" if endpoint is None or endpoint.startswith("https") else "http",
            allow_bucket_creation=False,
            connect_timeout=5,
            request_timeout=60,
        )

    @cached_property
    def _range_pool(self) -> ThreadPoolExecutor:
        """Merged ranged reads: few at a time, each up to READ_SPAN_MAX_BYTES in memory."""
        return ThreadPoolExecutor(
            max_workers=self.settings.read_ranges_in_flight, thread_name_prefix="s3-range"
        )

    @cached_property
    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.max_connections, thread_name_prefix="s3")

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """Every key under a prefix (for tests and small listings)."""
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}/{prefix}") from exc
        return keys

    def _translate_obstore(self, exc: Exception, where: str) -> Exception:
        """obstore's errors in Quarry's tree: a missing object or bucket, a refusal (4xx), or an
        endpoint that did not answer or answered 5xx (transient; obstore retried it already)."""
        if isinstance(exc, FileNotFoundError | obstore.exceptions.NotFoundError):
            return ObjectMissing(f"no object at {where}")
        if isinstance(exc, DENIED):
            return StorageError(f"{where}: S3 refused the request (403): check the S3 keys")
        status = CLIENT_STATUS.search(str(exc))
        if status and status.group(1) not in {"408", "429"}:
            return StorageError(f"{where}: S3 refused with {status.group(1)}: {first_line(exc)}")
        return StorageUnavailable(f"S3 endpoint {self.endpoint} did not answer: {first_line(exc)}")

    def _translate(self, exc: Exception, where: str) -> Exception:
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code in MISSING_CODES:
                return ObjectMissing(f"no object at {where}")
            if code in TRANSIENT_CODES:
                return StorageUnavailable(f"{where}: S3 answered {code}")
            return StorageError(f"{where}: S3 refused with {code}")
        return StorageUnavailable(f"S3 endpoint {self.endpoint} did not answer: {exc}")


def credentials(settings: Settings) -> dict[str, str]:
    """The S3 keys when both are set; none otherwise, so that boto3 and Arrow take the AWS
    credential chain (environment, profile, instance role, IRSA's web identity)."""
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        return {
            "aws_access_key_id": settings.aws_access_key_id,
            "aws_secret_access_key": settings.aws_secret_access_key,
        }
    return {}


def object_store(settings: Settings, bucket: str) -> S3Store:
    """An obstore client for `bucket` on the configured endpoint: the keys when set, else the AWS
    credential chain as boto3 walks it (environment, profile, instance role, web identity), and
    unsigned requests where that chain finds nothing (a public bucket reads; a private one answers
    403, one line); path-style addressing, boto3's timeouts, 3 retries of a transient error."""
    endpoint = settings.s3_endpoint_url
    keys = credentials(settings)
    auth: dict[str, Any]
    if keys:
        auth = {
            "access_key_id": keys["aws_access_key_id"],
            "secret_access_key": keys["aws_secret_access_key"],
        }
    elif (session := boto3.Session()).get_credentials() is not None:
        auth = {"credential_provider": Boto3CredentialProvider(session)}
    else:
        auth = {"skip_signature": True}
    return S3Store(
        bucket,
        endpoint=endpoint,
        region=settings.aws_default_region,
        virtual_hosted_style_request=False,
        client_options={
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": timedelta(seconds=5),
            "timeout": timedelta(seconds=60),
        },
        retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=60)},
        **auth,
    )


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
