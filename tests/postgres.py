"""The PostgreSQL server the tests use: one with pgvector, since a job with the shipped model
records embeddings (docs/content.md). This machine's server when it offers the `vector`
extension, else the embedded one `make up` starts (tests/vector_server.py), started once per
test session on first use and stopped when the session's process exits."""

from __future__ import annotations

import atexit
import contextlib
from functools import cache
from urllib.parse import urlsplit

from tests.vector_server import MACHINE, vector_server


@cache
def base_url() -> str:
    """postgresql://postgres@host:port of the tests' server."""
    stack = contextlib.ExitStack()
    url = stack.enter_context(vector_server())
    atexit.register(stack.close)
    return url


def pg_url(database: str, user: str = "postgres") -> str:
    """A URL of one database of the tests' server, logged in as `user` (trust authentication)."""
    return base_url().replace("postgres@", f"{user}@", 1) + f"/{database}"


def pg_port() -> int:
    return urlsplit(base_url()).port or 5432


def machine_url(database: str) -> str:
    """A database of this machine's own server (which may lack pgvector)."""
    return f"{MACHINE}/{database}"
