"""Coalesced reads: a chunk's images in a packed shard are read in few ranged GETs (counted from
the S3 server's request log), against the real pools."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import psycopg
import pytest

from common.config import Settings
from common.storage import ObjectStore
from tests.conftest import run_job
from tests.stack import RequestLog


def raw_gets(log: RequestLog, settings: Settings) -> int:
    return sum(
        1
        for method, path in log.requests()
        if method == "GET" and path.startswith(f"/{settings.raw_bucket}/packed/")
    )


@pytest.mark.parametrize(
    ("where", "most_per_image"),
    [
        pytest.param("true", 0.01, id="full-scan"),
        pytest.param("s.id % 10 = 3", 0.2, id="10-percent"),
        pytest.param("s.id % 100 = 7", 1.0, id="1-percent"),
    ],
)
@pytest.mark.usefixtures("workers")
def test_a_selection_reads_its_shard_in_few_gets(
    ingested: dict[str, str],
    settings: Settings,
    db: psycopg.Connection,
    s3_requests: RequestLog,
    where: str,
    most_per_image: float,
) -> None:
    query = f"SELECT s.id FROM styles s JOIN images i USING (id) WHERE i.status = 'stored' AND {where}"
    selected = len(db.execute(query).fetchall())
    s3_requests.mark()
    code, summary = run_job(ingested, "--query", query, "--chunk-size", "300", "--output", "webdataset")
    assert code == 0 and summary["done"] == selected > 0
    gets = raw_gets(s3_requests, settings)
    assert gets / selected <= most_per_image
    assert gets == 1  # the vendored sample is one packed shard of about 700 KB: one chunk, one GET


MEMBER = 64 * 1024
MEMBERS = 8192  # a 512 MiB shard
READER = """
import json, resource, sys
from common.config import get_settings
from common.sources import Source
from common.storage import ObjectStore
uri, size, etag, wanted = json.loads(sys.stdin.read())
sources = [Source(uri, offset, length, etag, size) for offset, length in wanted]
store = ObjectStore(get_settings())
store.read_many(sources[:1])  # warm: clients, threads, connections
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
got = store.read_many(sources)
assert all(isinstance(got[source], tuple) and len(got[source][0]) == source.length for source in sources)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # MiB
"""
# the 64 MiB asked for, 4 merged reads of 16 MiB in flight, and slack for the allocator
GROWTH_MIB = 192


def test_reading_an_eighth_of_a_512_mib_shard_stays_under_its_memory_bound(
    test_env: dict[str, str], store: ObjectStore, tmp_path: Path
) -> None:
    """Every 8th 64 KiB member of a 512 MiB shard: holes of 448 KiB merge into 16 MiB reads (32
    of them), fetched 4 at a time; the reading process's peak RSS grows by less than GROWTH_MIB
    over what it held once warm."""
    path = tmp_path / "big.tar"
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for number in range(MEMBERS):
            info = tarfile.TarInfo(f"{number:06d}.bin")
            info.size = MEMBER
            tar.addfile(info, io.BytesIO(bytes([number % 251]) * MEMBER))
            offsets.append(tar.fileobj.tell() - MEMBER)  # type: ignore[union-attr]
    store.ensure_bucket("big-shards")
    store.upload_file(str(path), "big-shards", "big.tar", content_type="application/x-tar")
    size, etag = store.head("big-shards", "big.tar")
    assert size >= MEMBERS * MEMBER
    wanted = [(offset, MEMBER) for offset in offsets[::8]]
    out = subprocess.run(
        [sys.executable, "-c", READER],
        input=json.dumps(["s3://big-shards/big.tar", size, etag, wanted]),
        env={**os.environ, **test_env},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    before, peak = map(int, out.stdout.strip().splitlines()[-1].split())
    print(f"peak RSS {peak} MiB, {before} MiB when warm")
    assert peak - before < GROWTH_MIB, f"peak RSS {peak} MiB, {before} MiB when warm"
    store.delete("big-shards", "big.tar")
