"""How long one 16 MiB ranged GET takes from moto's S3 server, by the size of the object it is
cut from: moto reads (copies) the whole object for every ranged GET, so Quarry's merged ranged
reads of a large shard cost more on it than on S3. Run: python -m bench.moto_ranges"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import boto3

from tests.stack import start_moto

SPAN = 16 * 1024 * 1024  # READ_SPAN_MAX_BYTES' default
SIZES_MIB = (16, 64, 256)  # 256 MiB: the largest packed shard
PASSES = 6


def main() -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; S3: moto_server;"
        f" a {SPAN >> 20} MiB ranged GET"
    )
    with TemporaryDirectory() as folder:
        server, endpoint = start_moto(Path(folder) / "moto.log")
        try:
            s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
                region_name="us-east-1",
            )
            s3.create_bucket(Bucket="bench-ranges")
            for size_mib in SIZES_MIB:
                s3.put_object(Bucket="bench-ranges", Key=f"o{size_mib}", Body=os.urandom(size_mib << 20))
                seconds = []
                for _ in range(PASSES):
                    started = time.perf_counter()
                    body = s3.get_object(
                        Bucket="bench-ranges", Key=f"o{size_mib}", Range=f"bytes=0-{SPAN - 1}"
                    )
                    assert len(body["Body"].read()) == SPAN
                    seconds.append(time.perf_counter() - started)
                median = sorted(seconds)[PASSES // 2]
                print(f"  object of {size_mib:4d} MiB: {median * 1000:7.1f} ms (median of {PASSES})")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
