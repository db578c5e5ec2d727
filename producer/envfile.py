"""The stack's secrets file (QUARRY_ENV_FILE, default `.env`): what `make up` generates, kept
readable by its owner only (mode 600), and read by every Quarry process's settings."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from common.config import ENV_FILE
from common.errors import ConfigError


def env_file() -> Path:
    """QUARRY_ENV_FILE's path; ConfigError where it is set empty (no env file: nowhere to keep a
    generated secret)."""
    path = os.environ.get("QUARRY_ENV_FILE", ENV_FILE)
    if not path:
        raise ConfigError("QUARRY_ENV_FILE is empty: give the secrets the stack needs in settings")
    return Path(path)


def set_secret(name: str, value: str, path: Path | None = None) -> None:
    """Write NAME=value into the env file (replacing an earlier line), mode 600 from the start."""
    path = path or env_file()
    old = path.read_text().splitlines() if path.exists() else []
    lines = [line for line in old if not line.startswith(f"{name}=")]
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join([*lines, f"{name}={value}"]) + "\n")
    path.chmod(0o600)  # a file that existed keeps its mode through O_CREAT


def new_secret() -> str:
    """A random secret for a generated setting (192 bits, URL-safe: it goes into URLs)."""
    return secrets.token_hex(24)
