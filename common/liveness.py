"""Who holds which chunk, and whether they are still alive: how a lost worker's chunks are sent
again within seconds instead of when their lease runs out.

Each worker process that runs a stage task is a *holder*: it says it is alive in `holders` every
WORKER_HEARTBEAT_S (a thread of its own), and keeps a row in `holds` for every chunk whose message
it is working on (`StageTask.__call__`). The dispatcher ends the lease of every chunk a holder
silent for HOLDER_TIMEOUT_S held (`heal_lost_holds`), and of every chunk no one holds and no
message in the broker can be for (`heal_lost_messages`: every queue is empty); the ledger's
usual lease expiry then sends them again, counting an attempt where one had started. A retried
chunk is rendered carefully: each image is marked before it is rendered, the marked image of a
lost process becomes the chunk's suspect, and on the chunk's last attempt a suspect is failed
alone instead of taking the rest of its chunk down with it again (workers/transform.py).
docs/decisions.md ("Liveness").
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import psycopg

from common.db import connect, first_line
from common.ledger import Ticket, lease

log = logging.getLogger(__name__)


class Heartbeat:
    """This process's name in `holders`, renewed every `interval_s` by a daemon thread. A forked
    child gets a name and a thread of its own on first use."""

    def __init__(self, database_url: str, interval_s: float) -> None:
        self.database_url = database_url
        self.interval_s = interval_s
        self._pid = 0
        self._name = ""
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The holder name, after a first heartbeat (so a hold never names an unknown holder)."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._name = f"{socket.gethostname()}:{self._pid}:{uuid.uuid4().hex[:6]}"
                with connect(self.database_url, autocommit=True) as conn:
                    beat(conn, self._name)
                threading.Thread(target=self._run, args=(self._name,), daemon=True, name="heartbeat").start()
            return self._name

    def _run(self, name: str) -> None:
        stop = threading.Event()
        conn: psycopg.Connection | None = None
        while not stop.wait(self.interval_s):
            try:
                if conn is None or conn.closed:
                    conn = connect(self.database_url, autocommit=True)
                beat(conn, name)
            except Exception as exc:  # the thread's loop boundary: a missed beat is retried next time
                log.warning("heartbeat of %s missed: %s", name, first_line(exc))
                conn = None


def beat(conn: psycopg.Connection, name: str) -> None:
    conn.execute(
        "INSERT INTO holders (name, seen_at) VALUES (%s, now())"
        " ON CONFLICT (name) DO UPDATE SET seen_at = EXCLUDED.seen_at",
        (name,),
    )


def hold(conn: psycopg.Connection, holder: str, task_id: str, ticket: Ticket) -> None:
    """`holder` works on message `task_id`, of the ticket's chunk, from now on."""
    conn.execute(
        "INSERT INTO holds (holder, task_id, job_id, chunk_index, dispatch) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        (holder, task_id, ticket.job_id, ticket.chunk, ticket.dispatch),
    )


def release(conn: psycopg.Connection, task_id: str, lease_s: int) -> None:
    """Message `task_id` is done with (by whichever process held it: a retried message holds on
    through its retries). What it sent on is queued now, so the hand-off counts as a touch of the
    chunk: it is not taken for lost before QUEUE_QUIET_S."""
    conn.execute(
        """
        WITH released AS (
            DELETE FROM holds WHERE task_id = %s RETURNING job_id, chunk_index
        )
        UPDATE job_chunks c SET lease_until = now() + %s::interval
        FROM released r WHERE c.job_id = r.job_id AND c.chunk_index = r.chunk_index AND c.state = 'dispatched'
        """,
        (task_id, lease(lease_s)),
    )


# --- the dispatcher's side ---------------------------------------------------------------


def heal_lost_holds(conn: psycopg.Connection, timeout_s: float) -> int:
    """End the lease of every dispatched chunk a holder silent for `timeout_s` held, and forget
    those holds and holders; how many chunks. A chunk dispatched again since (its lease ran out
    first) is left to its new dispatch."""
    holders = [
        row[0]
        for row in conn.execute(
            "DELETE FROM holders WHERE seen_at < now() - make_interval(secs => %s) RETURNING name",
            (timeout_s,),
        )
    ]
    if not holders:
        return 0
    return conn.execute(
        """
        WITH lost AS (
            DELETE FROM holds WHERE holder = ANY (%s) RETURNING job_id, chunk_index, dispatch
        ), chunks AS (
            SELECT c.job_id, c.chunk_index FROM job_chunks c JOIN lost l USING (job_id, chunk_index)
            WHERE c.state = 'dispatched' AND c.dispatches = l.dispatch
            ORDER BY c.job_id, c.chunk_index FOR UPDATE OF c SKIP LOCKED
        )
        UPDATE job_chunks c SET lease_until = now(), suspect = coalesce(c.rendering, c.suspect),
            last_error = 'its worker process was lost' || coalesce(' rendering image ' || c.rendering, '')
        FROM chunks l WHERE c.job_id = l.job_id AND c.chunk_index = l.chunk_index
        """,
        (holders,),
    ).rowcount


def heal_lost_messages(conn: psycopg.Connection, quiet_s: float, lease_s: int) -> int:
    """End the lease of every dispatched chunk that no one holds and no stage touched for
    `quiet_s` (its last touch set lease_until to then + `lease_s`): called only when every queue
    is empty. A worker takes a message only when a process is free to run it
    (`worker_disable_prefetch`), and holds it before it runs, so such a chunk's message is in no
    queue and in no process: it was lost."""
    return conn.execute(
        """
        WITH lost AS (
            SELECT c.job_id, c.chunk_index FROM job_chunks c JOIN jobs j ON j.id = c.job_id
            WHERE j.state = 'running' AND c.state = 'dispatched'
              AND c.lease_until < now() + %s::interval - make_interval(secs => %s)
              AND NOT EXISTS (SELECT FROM holds h WHERE h.job_id = c.job_id AND h.chunk_index = c.chunk_index)
            ORDER BY c.job_id, c.chunk_index FOR UPDATE OF c SKIP LOCKED
        )
        UPDATE job_chunks c SET lease_until = now()
        FROM lost l WHERE c.job_id = l.job_id AND c.chunk_index = l.chunk_index
        """,
        (lease(lease_s), quiet_s),
    ).rowcount


# --- a chunk whose worker process was lost: which image was it on? ------------------------


def mark_rendering(conn: psycopg.Connection, ticket: Ticket, image_id: int) -> None:
    """On a retried chunk, the image about to be rendered: if the process is lost now, it
    becomes the chunk's suspect (`heal_lost_holds`)."""
    conn.execute(
        """UPDATE job_chunks SET rendering = %s
           WHERE job_id = %s AND chunk_index = %s AND state = 'dispatched'""",
        (image_id, ticket.job_id, ticket.chunk),
    )
