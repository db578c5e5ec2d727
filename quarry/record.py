"""Recording a job's selection: slices read concurrently in one snapshot, chunks committed as they
are cut, so the dispatcher sends the first ones while the rest is still being read.

One thread coordinates: it holds the snapshot (a query-role transaction that exported it), the
job row and the end of the recording. SELECTION_CONNECTIONS reader threads each import the
snapshot on a query-role session of their own and take the next slice in order: a bounded
slice comes back as one sorted `bigint[]` cut into chunks without a Python int per id
(common/packed_ids.py), a streamed one as chunk rows through a cursor; it is cut into chunks
after the ids the slice before it left over and numbered after that slice's chunks (`Numbering`),
so the chunks are those of cutting the whole sorted selection, and each reader commits them on an
owner connection of its own (common/recording.py). Cancel stops every reader; the
first error fails the job (or, before any chunk was committed, removes it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg

from common.config import Settings
from common.db import connect, first_line
from common.errors import JobFailed, QuarryError, QueryError
from common.packed_ids import PackedIds, fill, register_packed_ids
from common.recording import (
    ChunkRow,
    append_chunks,
    close_recording,
    discard_recording,
    fail_recording,
    open_recording,
)
from quarry.query import EVERY_ID, OUTSIDE, read_slice, stream_slice, user_session
from quarry.slicing import Slice, SlicePlan

log = logging.getLogger(__name__)
CHUNKS_PER_COMMIT = 1000  # a reader commits a slice's chunks in transactions of at most this many
POLL_S = 0.25  # how often the coordinator looks for a cancel


@dataclass(frozen=True)
class Selection:
    """What one job records: its checked query, spec and chunking."""

    job_id: str
    query: str  # as the user gave it (kept on the job)
    body: str  # the checked statement
    spec: dict[str, object]
    variants: int
    chunk_size: int
    plan: SlicePlan


@dataclass
class Outcome:
    state: str = "recording"  # then running, finished, cancelled, failed or discarded
    error: Exception | None = None
    committed: threading.Event = field(default_factory=threading.Event)  # a chunk, or the end
    ended: threading.Event = field(default_factory=threading.Event)


class Recording:
    """The recording of one selection, on threads of its own (non-daemon: a process that exits
    waits for its recordings)."""

    def __init__(self, settings: Settings, selection: Selection) -> None:
        self.settings = settings
        self.selection = selection
        self.outcome = Outcome()
        self._slices: Iterator[Slice] = iter(selection.plan.slices)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._readers: list[psycopg.Connection] = []
        self._numbering = Numbering()
        self._thread = threading.Thread(target=self._coordinate, name=f"record-{selection.job_id[:8]}")

    @property
    def job_id(self) -> str:
        return self.selection.job_id

    def start(self) -> Recording:
        """Start, and return once the first chunks are committed (or the recording ended): a query
        that fails before then raises here and leaves no job."""
        self._thread.start()
        self.outcome.committed.wait()
        if self.outcome.state == "discarded" and self.outcome.error is not None:
            raise self.outcome.error
        return self

    def wait(self, timeout: float | None = None) -> Outcome:
        """Wait for the whole selection; JobFailed (one line) when its recording failed."""
        self.outcome.ended.wait(timeout)
        error = self.outcome.error
        if self.outcome.state == "discarded" and error is not None:
            raise error
        if self.outcome.state == "failed":
            raise JobFailed(f"job {self.job_id} failed while recording its selection: {error}")
        return self.outcome

    # --- the coordinator ---------------------------------------------------------------

    def _coordinate(self) -> None:
        selection, outcome = self.selection, self.outcome
        try:
            with (
                user_session(self.settings) as exporter,
                connect(self.settings.database_url, autocommit=True) as owner,
            ):
                snapshot = exporter.execute("SELECT pg_export_snapshot()").fetchone()
                assert snapshot is not None
                open_recording(owner, self.job_id, selection.query, selection.spec, selection.plan.note)
                readers = self._start_readers(str(snapshot[0]))
                while alive := [reader for reader in readers if reader.is_alive()]:
                    if self._cancelled(owner):
                        self._halt()
                    alive[0].join(POLL_S)
                outcome.state = self._conclude(owner)
        except Exception as exc:  # the recording's loop boundary: the job is failed below
            self._note_error(exc)
            outcome.state = "failed"
            log.exception("recording of job %s stopped", self.job_id)
        finally:
            outcome.committed.set()
            outcome.ended.set()

    def _start_readers(self, snapshot: str) -> list[threading.Thread]:
        count = min(self.settings.selection_connections, len(self.selection.plan.slices))
        readers = [
            threading.Thread(target=self._read, args=(snapshot,), name=f"slice-reader-{n}")
            for n in range(count)
        ]
        for reader in readers:
            reader.start()
        return readers

    def _cancelled(self, owner: psycopg.Connection) -> bool:
        row = owner.execute("SELECT state FROM jobs WHERE id = %s", (self.job_id,)).fetchone()
        return row is None or row[0] != "running"

    def _halt(self) -> None:
        """Stop every reader, cancelling the statement each is in."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            for conn in self._readers:
                conn.cancel_safe()

    def _conclude(self, owner: psycopg.Connection) -> str:
        error = self.outcome.error
        if error is None:
            return close_recording(owner, self.job_id)
        if discard_recording(owner, self.job_id):
            return "discarded"
        fail_recording(owner, self.job_id, str(error))
        return "failed"

    def _note_error(self, exc: Exception) -> None:
        with self._lock:
            if self.outcome.error is None:
                self.outcome.error = exc if isinstance(exc, QuarryError) else QueryError(first_line(exc))
        self._halt()

    # --- a reader ----------------------------------------------------------------------

    def _read(self, snapshot: str) -> None:
        selection = self.selection
        try:
            with (
                user_session(self.settings, snapshot) as reader,
                connect(self.settings.database_url, autocommit=True) as writer,
            ):
                register_packed_ids(reader)
                with self._lock:
                    self._readers.append(reader)
                while (piece := self._next_slice()) is not None:
                    for rows in self._chunks(reader, piece):
                        if self._stop.is_set():
                            return
                        if not append_chunks(writer, self.job_id, rows, selection.variants):
                            self._halt()  # cancelled: nothing more is recorded
                            return
                        if rows:
                            self.outcome.committed.set()
        except Exception as exc:  # a reader's loop boundary: the coordinator fails the job
            if not self._stop.is_set():  # a statement cancelled by _halt is no error of its own
                self._note_error(exc)

    def _next_slice(self) -> Slice | None:
        with self._lock:
            return None if self._stop.is_set() else next(self._slices, None)

    def _chunks(self, reader: psycopg.Connection, piece: Slice) -> Iterator[list[ChunkRow]]:
        """A slice's chunk rows in batches to commit: its ids after the ones the slice before it
        left over, cut into full chunks numbered after that slice's, so the chunks are the ones
        cutting the whole sorted selection would give. A bounded slice leaves its last ids to the
        next; the last slice (streamed) commits them as the selection's last chunk."""
        size = self.selection.chunk_size
        if piece.streamed:
            if (handed := self._numbering.take(piece.number, self._stop)) is None:
                return
            index, carry = handed
            for fetched in self._stream(reader, piece):  # a commit per fetch
                rows: list[ChunkRow] = []
                for more in fetched:
                    full, carry = fill(carry, more, size)
                    rows.extend((index + n, ids, len(ids)) for n, ids in enumerate(full))
                    index += len(full)
                yield rows
            yield [(index, carry, len(carry))] if len(carry) else []
            return
        assert piece.low is not None and piece.high is not None
        more = read_slice(reader, self.selection.body, piece.low, piece.high)
        if (handed := self._numbering.take(piece.number, self._stop)) is None:
            return
        index, carry = handed
        full, carry = fill(carry, more, size)
        self._numbering.hand_on(piece.number, index + len(full), carry)
        rows = [(index + n, ids, len(ids)) for n, ids in enumerate(full)]
        for start in range(0, len(rows), CHUNKS_PER_COMMIT):
            yield rows[start : start + CHUNKS_PER_COMMIT]

    def _stream(self, reader: psycopg.Connection, piece: Slice) -> Iterator[list[PackedIds]]:
        """A streamed slice's ids, sorted, in pieces of the chunk size (cut by the server), a
        fetch at a time."""
        where = EVERY_ID if piece.low is None else OUTSIDE
        params = {"first": 0, "size": self.selection.chunk_size, "low": piece.low, "high": piece.high}
        for batch in stream_slice(reader, self.selection.body, where, params, self.settings.query_timeout_s):
            yield [ids for _, ids, _ in batch]


class Numbering:
    """What each slice starts from: the next chunk index and the ids the slice before it left
    over. Slices are taken in order, so each waits at most for its predecessor's read (not its
    commit); the chunks are numbered densely in id order, and are the same on every run over the
    same catalog."""

    def __init__(self) -> None:
        self._handed: dict[int, tuple[int, PackedIds]] = {0: (0, PackedIds(memoryview(b"")))}
        self._changed = threading.Condition()

    def take(self, number: int, stop: threading.Event) -> tuple[int, PackedIds] | None:
        """(first chunk index, ids left over) for slice `number`; None when the recording stops
        meanwhile."""
        with self._changed:
            while number not in self._handed:
                if stop.is_set():
                    return None
                self._changed.wait(POLL_S)
            return self._handed.pop(number)

    def hand_on(self, number: int, next_index: int, left_over: PackedIds) -> None:
        """Slice `number` is cut: the next slice starts at `next_index` with `left_over`."""
        with self._changed:
            self._handed[number + 1] = (next_index, left_over)
            self._changed.notify_all()
