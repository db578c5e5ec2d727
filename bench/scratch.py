"""A PostgreSQL database of its own for one bench run, dropped after it (whatever happened)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from common.db import connect, ensure_database

SERVER = "postgresql://postgres@127.0.0.1:5432"


@contextmanager
def scratch_database(prefix: str, server: str = SERVER) -> Iterator[str]:
    """The URL of a new database `{prefix}_{random}` on `server` (the machine's PostgreSQL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    url = f"{server}/{name}"
    ensure_database(url)
    try:
        yield url
    finally:
        with connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
