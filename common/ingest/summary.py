"""What an ingest did: counted as it goes, printed by the CLI, returned by the API."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
REPORTS_KEPT = 50  # problems kept word for word; the rest are counted


@dataclass
class IngestSummary:
    """Counts of one ingest; `problems` names what was skipped and why (shards, lines)."""

    dataset: str = ""
    rows: int = 0  # catalog rows read
    repaired: int = 0  # styles.csv lines repaired (extra commas joined back)
    rejected: int = 0  # manifest lines that could not be read
    duplicate_ids: int = 0  # styles.csv ids given more than once (the last line wins)
    images: int = 0  # image locations registered by this run
    packed: int = 0  # images packed into Quarry's shards by this run
    replaced: int = 0  # of those, images whose file changed since it was packed (the new bytes replace it)
    shards: int = 0  # shards written or registered by this run
    shards_present: int = 0  # shards registered before, skipped
    files_uploaded: int = 0  # files of a local WebDataset folder uploaded by this run
    present: int = 0  # rows or images registered before, skipped
    missing: int = 0  # catalog rows with no image location
    bad: int = 0  # images found unreadable (recorded: their items fail)
    unrecognised_files: int = 0  # files of an image folder not named {id}.{jpg,png,webp}
    members_without_image: int = 0  # WebDataset keys with no image member
    rows_without_member: int = 0  # metadata rows whose key has no image in the shard
    units_present: int = 0  # files, row groups or shards an earlier ingest registered, skipped
    units_failed: int = 0  # units that could not be registered (each one a problem, with why)
    job_id: str | None = None  # the ingest job that ran through the pools, if one did
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic, repr=False)

    @property
    def images_seen(self) -> int:
        return self.images + self.present + self.bad

    def report(self, problem: str) -> None:
        """Something skipped, with why: logged, kept (the first REPORTS_KEPT) and counted."""
        self.problem_count += 1
        log.warning("%s", problem)
        if len(self.problems) < REPORTS_KEPT:
            self.problems.append(problem)

    def finish(self) -> IngestSummary:
        self.seconds = time.monotonic() - self.started
        return self
