"""A watchdog for the dispatcher's loop: a dispatcher whose loop stops turning exits, so that its
supervisor (Compose `restart:`, a Kubernetes Deployment) starts a fresh one.

The loop can hang where no error is ever raised: a PostgreSQL or Redis peer that went silent
(a network partition, a frozen host) leaves a blocking read waiting forever. Nothing in the loop
can notice that, so a daemon thread watches the time since the last `beat()`. It ends the process
with `os._exit`: the main thread is stuck, and a clean shutdown would wait for it. Exiting is
safe at any moment; the claimed chunks' leases run out and another dispatcher sends them again.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)
EXIT_STALLED = 3


class Watchdog:
    def __init__(self, stall_s: float, what: str) -> None:
        self.stall_s = stall_s
        self.what = what
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def beat(self) -> None:
        """The loop turned."""
        self._last_beat = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds since the last beat, once that is more than `stall_s`; else 0."""
        idle = time.monotonic() - self._last_beat
        return idle if idle > self.stall_s else 0.0

    def _watch(self) -> None:
        while True:
            time.sleep(min(5.0, self.stall_s / 4))
            if idle := self.stalled_for():
                log.error("%s stalled: no progress for %.0f s; exiting to be restarted", self.what, idle)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(EXIT_STALLED)
