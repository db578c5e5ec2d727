"""The images' GETs and the outputs' PUTs (obstore) against a real S3 server process: what they
store is what boto3 reads back, and each failure is one line in Quarry's error tree."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from common.config import Settings
from common.errors import ObjectMissing, StorageError, StorageUnavailable
from common.sources import Source
from common.storage import ObjectStore
from tests.conftest import boto3_client
from tests.stack import RequestLog, free_port


def test_an_output_put_keeps_its_type_and_metadata_for_every_client(
    store: ObjectStore, settings: Settings
) -> None:
    key, bucket = f"errors/{uuid.uuid4().hex}.jpg", settings.raw_bucket  # a bucket images may come from
    store.ensure_bucket(bucket)
    store.put(bucket, key, b"\xff\xd8jpeg", content_type="image/jpeg", metadata={"job-id": "j1"})
    head = boto3_client(settings).head_object(Bucket=bucket, Key=key)
    assert (head["ContentType"], head["Metadata"]) == ("image/jpeg", {"job-id": "j1"})
    assert store.get(bucket, key) == b"\xff\xd8jpeg"
    data, etag = store.read(Source(f"s3://{bucket}/{key}", etag=head["ETag"]))
    assert (data, etag) == (b"\xff\xd8jpeg", head["ETag"])


def test_a_missing_object_is_object_missing_in_one_line(store: ObjectStore, settings: Settings) -> None:
    store.ensure_bucket(settings.raw_bucket)
    uri = f"s3://{settings.raw_bucket}/errors/{uuid.uuid4().hex}.jpg"
    with pytest.raises(ObjectMissing) as raised:
        store.read(Source(uri))
    assert str(raised.value) == f"source vanished: {uri}"


def test_a_put_into_a_missing_bucket_names_the_bucket_in_one_line(store: ObjectStore) -> None:
    bucket = f"no-such-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError) as raised:
        store.put(bucket, "k.jpg", b"x", content_type="image/jpeg", metadata={})
    assert str(raised.value) == f"s3://{bucket}/k.jpg: S3 has no bucket {bucket!r}"


def test_an_endpoint_that_does_not_answer_is_transient_in_one_line(settings: Settings) -> None:
    silent = ObjectStore(settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(StorageUnavailable) as raised:
        silent.read(Source("s3://any-bucket/k.jpg"))
    message = str(raised.value)
    assert message.startswith("S3 endpoint http://127.0.0.1:") and "\n" not in message


def test_without_keys_the_aws_chain_is_asked_and_nothing_found_means_unsigned(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_requests: RequestLog
) -> None:
    """No keys set and none in the AWS chain: requests go unsigned (a public bucket's reads work),
    instead of failing before any request. The test server wants keys, so it refuses the GET."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    anonymous = ObjectStore(
        settings.model_copy(update={"aws_access_key_id": "", "aws_secret_access_key": ""})
    )
    key = f"errors/{uuid.uuid4().hex}.jpg"
    with pytest.raises(StorageError) as raised:
        anonymous.read(Source(f"s3://{settings.raw_bucket}/{key}"))
    assert str(raised.value).endswith("S3 refused the request (403): check the S3 keys")
    assert ("GET", f"/{settings.raw_bucket}/{key}") in s3_requests.requests()  # the GET was made
