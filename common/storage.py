"""S3-compatible object storage: the only module that talks to boto3."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import boto3
import boto3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError

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
        """Store an object (overwriting: keys are deterministic, so a rerun writes the same)."""
        try:
            self._client.put_object(
                Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata=dict(metadata)
            )
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}/{key}") from exc

    def delete(self, bucket: str, key: str) -> None:
        """Remove an object (S3 answers the same whether or not it existed)."""
        try:
            self._client.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}/{key}") from exc

    def get(self, bucket: str, key: str) -> bytes:
        """An object's bytes; ObjectMissing when there is none."""
        try:
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}/{key}") from exc

    def read(self, source: Source) -> tuple[bytes, str]:
        """An image's bytes and the ETag of the object holding them: the whole object, or the
        member's byte range; errors as `fetch` raises them."""
        if refusal := self.refused(source):
            raise refusal
        read = Read(source.uri, source.etag, source.offset, source.length, [source])
        data, etag = self.fetch(read)
        return read.slice_of(data, source), etag

    def fetch(self, read: Read) -> tuple[bytes | bytearray, str]:
        """One GET: the object, or its range. A pinned ETag is sent as If-Match: SourceChanged
        when the object was rewritten since, ObjectMissing when it is gone."""
        bucket, key = parse_s3_uri(read.uri)
        request: dict[str, str] = {"Bucket": bucket, "Key": key}
        if read.start is not None and read.length is not None:
            request["Range"] = f"bytes={read.start}-{read.start + read.length - 1}"
        if read.etag:
            request["IfMatch"] = read.etag
        try:
            response = self._client.get_object(**request)
            etag = str(response.get("ETag", ""))
            if len(read.sources) > 1 and read.length is not None:  # a merged range: no second copy
                return read_into(response["Body"], read.length), etag
            size = int(response.get("ContentLength") or 0)
            if size > self.settings.image_max_bytes:  # an image's own object: its size is the header's
                response["Body"].close()
                raise self.refuse_size(read.uri, size)
            return response["Body"].read(), etag
        except ClientError as exc:
            if _code(exc) in {"PreconditionFailed", "412"}:
                raise SourceChanged(f"source changed since it was registered: {read.uri}") from exc
            if _code(exc) in MISSING_CODES:
                raise ObjectMissing(f"source vanished: {read.uri}") from exc
            raise self._translate(exc, read.uri) from exc
        except (BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, read.uri) from exc

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

        def fetch(read: Read) -> tuple[bytes | bytearray, str] | QuarryError:
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


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def read_into(body: Any, length: int) -> bytearray:
    """A response body of `length` bytes read into one buffer of that size, chunk by chunk (a
    plain read() holds the chunks and their join at once: twice the bytes)."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    position = 0
    for chunk in body.iter_chunks(1024 * 1024):
        view[position : position + len(chunk)] = chunk
        position += len(chunk)
    if position != length:
        raise StorageUnavailable(f"a ranged read returned {position} of {length} bytes")
    return buffer
