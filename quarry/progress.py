"""Following a job until it ends; what is shown while it runs is up to a Display."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

import psycopg

from common.errors import UserError
from common.jobs import JobProgress, dispatcher_last_seen_s, job_progress

BAR_WIDTH = 30
DISPATCHER_SILENT_S = 10  # a dispatcher says it is alive every tick (DISPATCH_INTERVAL_S)


class Display(Protocol):
    def update(self, progress: JobProgress) -> None: ...
    def warn(self, message: str) -> None: ...
    def close(self, progress: JobProgress) -> None: ...


def render(progress: JobProgress) -> str:
    """`[#####-----] 120/400 done · 2 failed · 35.1 img/s · 3.4 s`; while the selection is still
    being recorded the total is what is recorded so far: `120/400+ done · … · recording`."""
    finished = progress.done + progress.failed
    filled = BAR_WIDTH * finished // progress.total if progress.total else BAR_WIDTH
    rate = finished / progress.seconds if progress.seconds > 0 else 0.0
    recording = progress.state == "recording"
    return (
        f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {progress.done}/{progress.total}"
        f"{'+' if recording else ''} done · {progress.failed} failed · {rate:.1f} img/s"
        f" · {progress.seconds:.1f} s{' · recording' if recording else ''}"
    )


def render_ingest(progress: JobProgress, registered: dict[str, int]) -> str:
    """`ingest: 3/10 units · 1,234,567 rows · 41,152 rows/s · 1,200,000 images · 3 shards ·
    0 failed · 30.0 s`: an ingest job's units, and the rows, images and shards its finished units
    registered (`registered`, from common.ingest.units.registered_so_far)."""
    rows = registered.get("rows", 0)
    rate = rows / progress.seconds if progress.seconds > 0 else 0.0
    return (
        f"ingest: {progress.done + progress.failed}/{progress.total} units · {rows:,} rows"
        f" · {rate:,.0f} rows/s · {registered.get('images', 0):,} images"
        f" · {registered.get('shards', 0):,} shards · {progress.failed} failed · {progress.seconds:.1f} s"
    )


class TerminalBar:
    """The CLI's display: a refreshed line on a terminal, the last line only otherwise."""

    def __init__(self, out: TextIO = sys.stderr, line: Callable[[JobProgress], str] = render) -> None:
        self.out = out
        self.line = line

    def update(self, progress: JobProgress) -> None:
        if self.out.isatty():
            self.out.write("\r" + self.line(progress))
            self.out.flush()

    def warn(self, message: str) -> None:
        self.out.write(f"\n{message}\n")

    def close(self, progress: JobProgress) -> None:
        self.out.write(("\r" if self.out.isatty() else "") + self.line(progress) + "\n")


def follow(
    conn: psycopg.Connection,
    job_id: str,
    display: Display,
    *,
    timeout_s: float | None = None,
    interval_s: float = 0.5,
    stall_warning_s: float = 60,
) -> JobProgress:
    """Poll the job's counts until every item is done or failed (or the timeout passes); say so
    once when nothing moved for `stall_warning_s` (are the pools running?)."""
    started = last_change = time.monotonic()
    last_seen = -1
    warned = False
    while True:
        progress = job_progress(conn, job_id)
        if progress is None:
            raise UserError(f"no job {job_id}")
        finished = progress.done + progress.failed
        display.update(progress)
        now = time.monotonic()
        if finished != last_seen:
            last_seen, last_change, warned = finished, now, False
        elif not warned and now - last_change > stall_warning_s:
            display.warn(f"no progress for {stall_warning_s:g} s: {stall_hint(conn)}")
            warned = True
        if progress.ended:
            break
        if timeout_s is not None and now - started > timeout_s:
            break
        time.sleep(interval_s)
    display.close(progress)
    return progress


def stall_hint(conn: psycopg.Connection) -> str:
    """What to look at when a job does not move."""
    seen = dispatcher_last_seen_s(conn)
    if seen is None or seen > DISPATCHER_SILENT_S:
        since = "ever" if seen is None else f"for {seen:.0f} s"
        return f"no dispatcher has been seen {since}: start `producer dispatch` (`make up` starts one)"
    return "is every worker pool running? (celery -A workers inspect ping)"
