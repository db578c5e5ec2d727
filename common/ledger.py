"""The chunk ledger: what the stages and the dispatcher record about each chunk of a job.

A chunk is `pending` until the dispatcher sends it (`dispatched`, with a lease deadline and a new
dispatch number); the first worker to start that dispatch counts an attempt; every stage that
touches it renews the lease; the stage that records its last
item marks it `finished` and adds its counts to the job's (which finishes once its selection is
recorded whole, common/recording.py, and every item is in). Each item has a slot in the chunk
(image index x variants + variant) and a bit in the chunk's done or failed bitmap, so recording
the same result twice (a redelivered or re-dispatched message) changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psycopg

from common.errors import UnknownJob

ItemStatus = Literal["done", "failed"]
ItemRows = Literal["all", "failures"]


@dataclass(frozen=True)
class ItemResult:
    """What a stage learned about one output item."""

    image_id: int
    variant: int
    slot: int  # the item's position in its chunk: image index x variants + variant
    status: ItemStatus
    output_uri: str | None = None
    error: str | None = None
    label: str | None = None
    score: float | None = None
    top_k: list[dict[str, Any]] | None = None
    inferred: bool = False  # the model ran on its image (else its outputs came from the catalog)


@dataclass(frozen=True)
class Ticket:
    """Which chunk (and which dispatch of it) a message belongs to."""

    job_id: str
    chunk: int
    dispatch: int  # which dispatch of the chunk sent this message

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Ticket:
        return cls(**message)


@dataclass(frozen=True)
class OpenChunk:
    """A dispatched chunk as the transform stage reads it."""

    image_ids: list[int]
    done: int  # bitmap of the slots already done (a retry or re-dispatch skips them)
    attempts: int = 1  # this one included
    suspect: int | None = None  # the image a lost worker process was rendering (common/liveness.py)


def bits_to_int(bits: str | None) -> int:
    """A bitmap column ('0101', slot 0 first) as an int whose bit s is slot s."""
    return int(bits[::-1], 2) if bits else 0


def int_to_bits(value: int, size: int) -> str:
    """The inverse of bits_to_int, `size` slots long."""
    return format(value, f"0{size}b")[::-1] if size else ""


def lease(lease_s: int) -> str:
    return f"{int(lease_s)} seconds"


def job_state(conn: psycopg.Connection, job_id: str) -> str:
    """The job's state; UnknownJob when this database has no such job."""
    row = conn.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()
    if row is None:
        raise UnknownJob(f"job {job_id} is not in this worker's database: is DATABASE_URL the producer's?")
    return str(row[0])


def touch(conn: psycopg.Connection, ticket: Ticket, lease_s: int) -> bool:
    """Renew a live chunk's lease; False when the chunk is finished, returned or its job stopped
    (the message is then dropped)."""
    row = conn.execute(
        """
        UPDATE job_chunks c SET lease_until = now() + %s::interval
        FROM jobs j
        WHERE j.id = c.job_id AND j.state = 'running'
          AND c.job_id = %s AND c.chunk_index = %s AND c.state = 'dispatched'
        RETURNING 1
        """,
        (lease(lease_s), ticket.job_id, ticket.chunk),
    ).fetchone()
    if row is None:
        job_state(conn, ticket.job_id)  # an unknown job is an error, not a stale message
    return row is not None


def open_chunk(conn: psycopg.Connection, ticket: Ticket, lease_s: int) -> OpenChunk | None:
    """Start (or go on with) a chunk: renew its lease, count an attempt the first time any of its
    messages is read since the last dispatch, and read its ids. Whichever message of the current
    dispatch round is read first runs the chunk, so a re-send never moves a queued chunk to the
    back; None when the message is stale (another message started it, the chunk finished, or its
    job stopped)."""
    row = conn.execute(
        """
        UPDATE job_chunks c SET lease_until = now() + %(lease)s::interval, rendering = NULL,
            attempts = c.attempts + (c.started_by IS NULL)::integer,
            started_by = coalesce(c.started_by, %(dispatch)s)
        FROM jobs j
        WHERE j.id = c.job_id AND j.state = 'running' AND c.job_id = %(job)s AND c.chunk_index = %(chunk)s
          AND c.state = 'dispatched' AND (c.started_by IS NULL OR c.started_by = %(dispatch)s)
        RETURNING c.image_ids, c.done_mask, c.attempts, c.suspect
        """,
        {"lease": lease(lease_s), "job": ticket.job_id, "chunk": ticket.chunk, "dispatch": ticket.dispatch},
    ).fetchone()
    if row is None:
        job_state(conn, ticket.job_id)
        return None
    return OpenChunk(list(row[0]), bits_to_int(row[1]), row[2], row[3])


UPSERT_ITEMS = """
INSERT INTO job_items (job_id, image_id, variant, status, output_uri, error, label, score, top_k)
SELECT %(job_id)s, * FROM unnest(
    %(image_id)s::bigint[], %(variant)s::integer[], %(status)s::text[], %(output_uri)s::text[],
    %(error)s::text[], %(label)s::text[], %(score)s::real[], %(top_k)s::jsonb[])
ON CONFLICT (job_id, image_id, variant) DO UPDATE SET
    status = EXCLUDED.status, output_uri = EXCLUDED.output_uri, error = EXCLUDED.error,
    label = EXCLUDED.label, score = EXCLUDED.score, top_k = EXCLUDED.top_k,
    updated_at = clock_timestamp()
"""


def upsert_items(conn: psycopg.Connection, job_id: str, results: Sequence[ItemResult]) -> None:
    """One row per item result, in one statement; rerunning leaves the same rows."""
    if not results:
        return
    conn.execute(
        UPSERT_ITEMS,
        {
            "job_id": job_id,
            "image_id": [r.image_id for r in results],
            "variant": [r.variant for r in results],
            "status": [r.status for r in results],
            "output_uri": [r.output_uri for r in results],
            "error": [r.error for r in results],
            "label": [r.label for r in results],
            "score": [r.score for r in results],
            "top_k": [None if r.top_k is None else json.dumps(r.top_k) for r in results],
        },
    )


def lock_running_job(conn: psycopg.Connection, job_id: str) -> bool:
    """Take the job row's weakest lock (FOR KEY SHARE), the first lock of a transaction that
    records into the job's chunks (docs/decisions.md, "Lock order"): recorders share it and it
    lets counter updates through, while cancel and retry (FOR UPDATE) wait for it and it for them.
    False when the job is not running; UnknownJob when there is no such job."""
    row = conn.execute("SELECT state FROM jobs WHERE id = %s FOR KEY SHARE", (job_id,)).fetchone()
    if row is None:
        job_state(conn, job_id)  # raises UnknownJob
    return row is not None and row[0] == "running"


def record_progress(
    conn: psycopg.Connection,
    ticket: Ticket,
    results: Sequence[ItemResult],
    item_rows: ItemRows,
    lease_s: int,
) -> bool:
    """Record item results against a live chunk (bitmaps, counts, item rows) in one transaction,
    finishing the chunk (and the job) when its last item is in; False when the chunk was not live."""
    with conn.transaction():
        if not lock_running_job(conn, ticket.job_id):
            return False
        row = conn.execute(
            """
            SELECT items, done_mask, failed_mask, inferred_mask FROM job_chunks
            WHERE job_id = %s AND chunk_index = %s AND state = 'dispatched'
            FOR UPDATE
            """,
            (ticket.job_id, ticket.chunk),
        ).fetchone()
        if row is None:
            return False
        items, done_bits, failed_bits, inferred_bits = row
        apply_results(
            conn,
            ticket,
            items,
            bits_to_int(done_bits),
            bits_to_int(failed_bits),
            results,
            item_rows,
            lease_s,
            bits_to_int(inferred_bits),
        )
        return True


def apply_results(
    conn: psycopg.Connection,
    ticket: Ticket,
    items: int,
    done: int,
    failed: int,
    results: Sequence[ItemResult],
    item_rows: ItemRows,
    lease_s: int,
    inferred: int = 0,
) -> None:
    """Merge results into a locked chunk's bitmaps; fold the counts into the job when it is full.
    A done result wins over a failed one, whichever came first; an item the model ran on counts
    as inferred when it first becomes done (a re-sent message counts nothing again)."""
    for result in results:
        if result.status == "done":
            if result.inferred and not (done >> result.slot) & 1:
                inferred |= 1 << result.slot
            done |= 1 << result.slot
        else:
            failed |= 1 << result.slot
    failed &= ~done
    upsert_items(
        conn, ticket.job_id, results if item_rows == "all" else [r for r in results if r.status == "failed"]
    )
    n_done, n_failed = done.bit_count(), failed.bit_count()
    finished = n_done + n_failed >= items
    conn.execute(
        """
        UPDATE job_chunks SET done_mask = %s::varbit, failed_mask = %s::varbit, done = %s, failed = %s,
            inferred_mask = %s::varbit,
            state = CASE WHEN %s THEN 'finished' ELSE state END, lease_until = now() + %s::interval
        WHERE job_id = %s AND chunk_index = %s
        """,
        (
            int_to_bits(done, items),
            int_to_bits(failed, items),
            n_done,
            n_failed,
            int_to_bits(inferred, items),
            finished,
            lease(lease_s),
            ticket.job_id,
            ticket.chunk,
        ),
    )
    if finished:
        conn.execute(
            """
            UPDATE jobs SET done = done + %s, failed = failed + %s, inferred = inferred + %s,
                state = CASE WHEN done + failed + %s >= total AND recorded_at IS NOT NULL
                             THEN 'finished' ELSE state END,
                finished_at = CASE WHEN done + failed + %s >= total AND recorded_at IS NOT NULL
                                   THEN clock_timestamp() END
            WHERE id = %s
            """,
            (n_done, n_failed, inferred.bit_count(), n_done + n_failed, n_done + n_failed, ticket.job_id),
        )


def note_failure(conn: psycopg.Connection, ticket: Ticket, error: str, release: bool) -> None:
    """Keep a stage's error on the chunk (it becomes the items' error if attempts run out);
    `release` ends the lease now, so a chunk that fails for a bug is retried without waiting."""
    conn.execute(
        """
        UPDATE job_chunks SET last_error = %s,
            lease_until = CASE WHEN %s THEN now() ELSE lease_until END
        WHERE job_id = %s AND chunk_index = %s AND state = 'dispatched'
        """,
        (error[:2000], release, ticket.job_id, ticket.chunk),
    )


def hand_back(conn: psycopg.Connection, ticket: Ticket) -> bool:
    """Give a started chunk back to the dispatcher without counting the attempt (the stage could
    not go on for a reason that is not the chunk's: its time ran out waiting for room); the done
    items stay done. False when the chunk is no longer this dispatch's."""
    return bool(
        conn.execute(
            """
            UPDATE job_chunks SET state = 'pending', lease_until = NULL, started_by = NULL,
                attempts = greatest(attempts - 1, 0)
            WHERE job_id = %s AND chunk_index = %s AND state = 'dispatched' AND started_by = %s
            """,
            (ticket.job_id, ticket.chunk, ticket.dispatch),
        ).rowcount
    )


# --- the dispatcher's side ---------------------------------------------------------------


def return_expired(conn: psycopg.Connection, max_attempts: int) -> int:
    """Chunks whose lease ran out go back to pending, unless a worker started their last allowed
    attempt; how many. A chunk whose message no worker took yet (lost with the broker, or still
    queued behind a slow pool) costs no attempt, so a long queue never fails items."""
    return conn.execute(
        """
        WITH expired AS (
            SELECT c.job_id, c.chunk_index FROM job_chunks c JOIN jobs j ON j.id = c.job_id
            WHERE j.state = 'running' AND c.state = 'dispatched' AND c.lease_until < now()
              AND NOT (c.started_by IS NOT NULL AND c.attempts >= %s)
            ORDER BY c.job_id, c.chunk_index
            FOR UPDATE OF c SKIP LOCKED
        )
        UPDATE job_chunks c SET state = 'pending', lease_until = NULL
        FROM expired e WHERE c.job_id = e.job_id AND c.chunk_index = e.chunk_index
        """,
        (max_attempts,),
    ).rowcount


def fail_exhausted(conn: psycopg.Connection, max_attempts: int, lease_s: int) -> int:
    """Fail the unfinished items of chunks whose last allowed lease ran out; how many chunks.
    Job rows are locked before chunk rows (the lock order); a job being cancelled or retried
    right now, and a chunk being recorded, are skipped until the next tick."""
    jobs = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM jobs WHERE state = 'running' ORDER BY id FOR KEY SHARE SKIP LOCKED"
        )
    ]
    rows = conn.execute(
        """
        SELECT c.job_id, c.chunk_index, c.dispatches, c.attempts, c.image_ids, c.items, c.done_mask,
               c.failed_mask, c.last_error, j.spec ->> 'item_rows', c.inferred_mask
        FROM job_chunks c JOIN jobs j ON j.id = c.job_id
        WHERE j.id = ANY (%s) AND c.state = 'dispatched' AND c.lease_until < now()
          AND c.started_by IS NOT NULL AND c.attempts >= %s
        ORDER BY c.job_id, c.chunk_index
        FOR UPDATE OF c SKIP LOCKED
        """,
        (jobs, max_attempts),
    ).fetchall()
    for (
        job_id,
        chunk,
        dispatch,
        attempts,
        image_ids,
        items,
        done_bits,
        failed_bits,
        last_error,
        item_rows,
        inferred_bits,
    ) in rows:
        why = last_error or f"no stage finished it within the {lease_s} s lease"
        error = f"gave up after {attempts} attempts: {why}"
        done, failed = bits_to_int(done_bits), bits_to_int(failed_bits)
        variants = items // len(image_ids)
        results = [
            ItemResult(image_ids[slot // variants], slot % variants, slot, "failed", error=error)
            for slot in range(items)
            if not ((done | failed) >> slot) & 1
        ]
        ticket = Ticket(str(job_id), chunk, dispatch)
        apply_results(
            conn,
            ticket,
            items,
            done,
            failed,
            results,
            item_rows or "all",
            lease_s,
            bits_to_int(inferred_bits),
        )
    return len(rows)


def claim_chunks(conn: psycopg.Connection, job_id: str, count: int, lease_s: int) -> list[tuple[int, int]]:
    """Mark up to `count` pending chunks of a job dispatched; (chunk index, dispatch) of each.
    The chunks are picked once (MATERIALIZED): as the inner side of a nested loop, a locking
    subquery is run again for each outer row, and each run skips the rows the update already
    moved and takes the next ones, so the LIMIT held for none of them (PostgreSQL 18 plans it so)."""
    rows = conn.execute(
        """
        WITH p AS MATERIALIZED (
            SELECT chunk_index FROM job_chunks WHERE job_id = %s AND state = 'pending'
            ORDER BY chunk_index LIMIT %s FOR UPDATE SKIP LOCKED
        )
        UPDATE job_chunks c SET state = 'dispatched', dispatches = c.dispatches + 1, started_by = NULL,
            lease_until = now() + %s::interval
        FROM p
        WHERE c.job_id = %s AND c.chunk_index = p.chunk_index
        RETURNING c.chunk_index, c.dispatches
        """,
        (job_id, count, lease(lease_s), job_id),
    ).fetchall()
    return sorted((int(index), int(dispatch)) for index, dispatch in rows)


def unclaim(conn: psycopg.Connection, tickets: Sequence[Ticket]) -> None:
    """Hand chunks whose message the broker refused back to pending."""
    for ticket in tickets:
        conn.execute(
            """UPDATE job_chunks SET state = 'pending', dispatches = dispatches - 1, lease_until = NULL
               WHERE job_id = %s AND chunk_index = %s AND state = 'dispatched' AND dispatches = %s""",
            (ticket.job_id, ticket.chunk, ticket.dispatch),
        )
