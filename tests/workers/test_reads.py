"""Coalesced reads: a chunk's images in a packed shard are read in few ranged GETs (counted from
the S3 server's request log), against the real pools."""

from __future__ import annotations

import psycopg
import pytest

from common.config import Settings
from tests.stack import RequestLog
from tests.workers.test_pipeline import run_job

pytestmark = pytest.mark.usefixtures("workers")


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
