"""The dispatcher's sleep between ticks, cut short when work arrives: it LISTENs on the channel
that recording a job and retrying one NOTIFY (common.jobs.wake_dispatchers), so a new job's
first chunks leave at once instead of up to DISPATCH_INTERVAL_S later. Losing the listening
connection costs nothing but that: the wait falls back to sleeping, and the next wait reconnects.
"""

from __future__ import annotations

import logging
import time

import psycopg

from common.db import connect, first_line
from common.errors import DatabaseUnavailable
from common.jobs import WAKE_CHANNEL

log = logging.getLogger(__name__)


class Wakeup:
    """One listening connection of its own (autocommit: LISTEN takes effect at once)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.conn: psycopg.Connection | None = None

    def wait(self, seconds: float) -> bool:
        """Up to `seconds`; True when a notification ended it early."""
        started = time.monotonic()
        try:
            if self.conn is None or self.conn.closed:
                self.conn = connect(self.database_url, autocommit=True)
                self.conn.execute(f"LISTEN {WAKE_CHANNEL}")
            for _ in self.conn.notifies(timeout=seconds, stop_after=1):
                return True
            return False
        except (psycopg.Error, DatabaseUnavailable) as exc:
            log.debug("dispatch wake-ups paused: %s", first_line(exc))
            self.close()
            time.sleep(max(0.0, seconds - (time.monotonic() - started)))
            return False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
