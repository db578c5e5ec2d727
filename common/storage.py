"""S3-compatible object storage: the only module that talks to boto3."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError

from common.config import Settings
from common.errors import ObjectMissing, QuarryError, StorageError, StorageUnavailable

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
        self.endpoint = settings.s3_endpoint_url or "AWS S3"
        self.max_connections = max_connections
        self._client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
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

    def get_many(self, bucket: str, keys: Sequence[str]) -> dict[str, bytes | QuarryError]:
        """Fetch objects concurrently; each key maps to its bytes or the error it raised."""

        def fetch(key: str) -> bytes | QuarryError:
            try:
                return self.get(bucket, key)
            except QuarryError as exc:
                return exc

        return dict(zip(keys, self._pool.map(fetch, keys), strict=True))

    @cached_property
    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.max_connections, thread_name_prefix="s3")

    def metadata(self, bucket: str, key: str) -> dict[str, str] | None:
        """An object's user metadata, or None when there is no such object."""
        try:
            return self._client.head_object(Bucket=bucket, Key=key)["Metadata"]
        except ClientError as exc:
            if _code(exc) in MISSING_CODES:
                return None
            raise self._translate(exc, f"s3://{bucket}/{key}") from exc
        except (BotoCoreError, ConnectionError) as exc:
            raise self._translate(exc, f"s3://{bucket}/{key}") from exc

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


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
