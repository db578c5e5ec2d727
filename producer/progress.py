"""Following a job until it ends, with a one-line progress bar on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import psycopg

from common.errors import UserError
from common.jobs import JobProgress, dispatcher_last_seen_s, job_progress

BAR_WIDTH = 30
STALL_WARNING_S = 60  # say so when nothing moved for this long: are the pools running?
DISPATCHER_SILENT_S = 10  # a dispatcher says it is alive every tick (DISPATCH_INTERVAL_S)


def render(progress: JobProgress) -> str:
    """`[#####-----] 120/400 done · 2 failed · 35.1 img/s · 3.4 s`."""
    finished = progress.done + progress.failed
    filled = BAR_WIDTH * finished // progress.total if progress.total else BAR_WIDTH
    rate = finished / progress.seconds if progress.seconds > 0 else 0.0
    return (
        f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {progress.done}/{progress.total} done"
        f" · {progress.failed} failed · {rate:.1f} img/s · {progress.seconds:.1f} s"
    )


def follow(
    conn: psycopg.Connection,
    job_id: str,
    *,
    timeout_s: float | None = None,
    interval_s: float = 0.5,
    out: TextIO = sys.stderr,
) -> JobProgress:
    """Poll the job's counts until every item is done or failed (or the timeout passes)."""
    started = last_change = time.monotonic()
    last_seen = -1
    warned = False
    while True:
        progress = job_progress(conn, job_id)
        if progress is None:
            raise UserError(f"no job {job_id}")
        finished = progress.done + progress.failed
        if out.isatty():
            out.write("\r" + render(progress))
            out.flush()
        now = time.monotonic()
        if finished != last_seen:
            last_seen, last_change, warned = finished, now, False
        elif not warned and now - last_change > STALL_WARNING_S:
            out.write(f"\nno progress for {STALL_WARNING_S} s: {stall_hint(conn)}\n")
            warned = True
        if progress.ended:
            break
        if timeout_s is not None and now - started > timeout_s:
            break
        time.sleep(interval_s)
    out.write(("\r" if out.isatty() else "") + render(progress) + "\n")
    return progress


def stall_hint(conn: psycopg.Connection) -> str:
    """What to look at when a job does not move."""
    seen = dispatcher_last_seen_s(conn)
    if seen is None or seen > DISPATCHER_SILENT_S:
        since = "ever" if seen is None else f"for {seen:.0f} s"
        return f"no dispatcher has been seen {since}: start `producer dispatch` (`make up` starts one)"
    return "is every worker pool running? (celery -A workers inspect ping)"
