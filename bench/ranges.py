"""How long one 16 MiB ranged GET takes, by the size of the object it is cut from, on the two S3
servers Quarry was measured on, side by side in one run: moto's server (the tests' and benchmarks'
S3 until 2026-12-05), which reads (copies) the whole object for every ranged GET, and the JuiceFS
gateway (MinIO's S3 API; tests/stack.py start_s3, with its counting proxy in front, as the tests
and benchmarks use it), which reads only the range. Run: python -m bench.ranges (moto: the
`bench` extra)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import boto3

from producer import s3_gateway
from tests.stack import free_port, start_s3, wait_until

SPAN = 16 * 1024 * 1024  # READ_SPAN_MAX_BYTES' default
SIZES_MIB = (16, 64, 256)  # 256 MiB: the largest packed shard
PASSES = 6


def median_get_ms(s3: Any, size_mib: int) -> float:
    """Put an object of `size_mib` MiB; the median time of a 16 MiB ranged GET from it."""
    s3.put_object(Bucket="bench-ranges", Key=f"o{size_mib}", Body=os.urandom(size_mib << 20))
    seconds = []
    for _ in range(PASSES):
        started = time.perf_counter()
        body = s3.get_object(Bucket="bench-ranges", Key=f"o{size_mib}", Range=f"bytes=0-{SPAN - 1}")
        assert len(body["Body"].read()) == SPAN
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[PASSES // 2] * 1000


def client(endpoint: str, access_key: str, secret_key: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
    )


def main() -> None:
    with TemporaryDirectory() as folder:
        real = start_s3(Path(folder))
        port = free_port()
        moto = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: s3_gateway.answers(f"http://127.0.0.1:{port}"), 20, "moto")
            servers = {
                "moto_server": client(f"http://127.0.0.1:{port}", "bench", "bench"),
                "JuiceFS gateway": client(real.endpoint, real.access_key, real.secret_key),
            }
            print(
                f"machine: {platform.machine()}, {os.cpu_count()} cores; a {SPAN >> 20} MiB ranged GET,"
                f" median of {PASSES}; real server: {real.describe()}"
            )
            for s3 in servers.values():
                s3.create_bucket(Bucket="bench-ranges")
            for size_mib in SIZES_MIB:
                times = {name: median_get_ms(s3, size_mib) for name, s3 in servers.items()}
                print(
                    f"  object of {size_mib:4d} MiB: "
                    + "; ".join(f"{name} {ms:7.1f} ms" for name, ms in times.items()),
                    flush=True,
                )
        finally:
            moto.terminate()
            moto.wait()
            real.stop()


if __name__ == "__main__":
    main()
