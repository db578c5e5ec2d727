"""A local WebDataset folder (img2dataset's output on disk) put where the pools can register it:
each shard's files uploaded as they are (one upload a file, nothing repacked) under
`s3://RAW_BUCKET/webdataset/{dataset}/`. A re-run uploads only what is missing or changed (the
SHA-256 of each file is kept in its object's metadata); a shard already registered is never
overwritten, since its registered byte ranges would no longer hold."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

from common.ingest.summary import IngestSummary
from common.storage import ObjectStore

UPLOADED = "webdataset"  # key prefix of uploaded local shards: webdataset/{dataset}/{file}
SHARD_FILES = (".tar", ".parquet")  # a shard and its metadata table (img2dataset's NNNNN.*)
DIGEST = "sha256"  # the object metadata keeping each file's digest
CONTENT_TYPES = {".tar": "application/x-tar", ".parquet": "application/octet-stream"}


def uploaded_prefix(bucket: str, dataset: str) -> str:
    return f"s3://{bucket}/{UPLOADED}/{dataset}/"


def shard_files(folder: Path) -> list[Path]:
    """The shard files of a local WebDataset folder, in name order (its top level only)."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in SHARD_FILES)


def upload_shards(
    conn: psycopg.Connection,
    store: ObjectStore,
    folder: Path,
    bucket: str,
    dataset: str,
    concurrency: int,
    summary: IngestSummary,
) -> str:
    """Upload the folder's shard files not uploaded before (or changed since); the s3:// prefix
    they are under, to be registered like any other."""
    prefix = uploaded_prefix(bucket, dataset)
    files = shard_files(folder)
    registered = {
        row[0]
        for row in conn.execute(
            "SELECT uri FROM shards WHERE uri = ANY (%s)", ([f"{prefix}{path.name}" for path in files],)
        )
    }
    store.ensure_bucket(bucket)
    folder_key = prefix.removeprefix(f"s3://{bucket}/")
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload") as pool:
        outcomes = pool.map(
            lambda path: upload_if_changed(
                store, path, bucket, folder_key + path.name, f"{prefix}{path.stem}.tar" in registered
            ),
            files,
        )
        for path, outcome in zip(files, outcomes, strict=True):
            if outcome == "uploaded":
                summary.files_uploaded += 1
            elif outcome == "changed":
                summary.report(
                    f"{path}: changed since its shard was registered; not uploaded again"
                    " (drop the dataset to ingest the folder anew)"
                )
    return prefix


def upload_if_changed(store: ObjectStore, path: Path, bucket: str, key: str, registered: bool) -> str:
    """`uploaded`, `unchanged`, or `changed` (differs from a registered shard's: left as it is)."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    there = store.metadata(bucket, key)
    if there is not None and there.get(DIGEST) == digest:
        return "unchanged"
    if there is not None and registered:
        return "changed"
    content_type = CONTENT_TYPES[path.suffix]
    store.upload_file(str(path), bucket, key, content_type=content_type, metadata={DIGEST: digest})
    return "uploaded"
