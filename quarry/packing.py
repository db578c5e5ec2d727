"""Packing a local folder of images into Quarry-owned tar shards in the raw bucket: one upload per
shard instead of one PUT per image, each image then read by its byte range."""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg

from common.batching import batched
from common.datasets import Dataset
from common.errors import PermanentError
from common.image_header import read_header
from common.images import decode
from common.ingest.register import Member, add_bad_images, add_member_locations, add_shard, load_members
from common.ingest.summary import IngestSummary
from common.storage import ObjectStore, parse_s3_uri
from common.tarball import TarWriter

log = logging.getLogger(__name__)

SHARD_MAX_IMAGES = 10_000  # img2dataset's samples per shard
SHARD_MAX_BYTES = 256 * 1024 * 1024  # within WebDataset's advice of 100 MB to 1 GB shards
FILES_PER_BATCH = 256  # files read and checked together; bounds memory


@dataclass(frozen=True)
class ImageFile:
    """One file read: its bytes and size, or why it is not an image."""

    image_id: int
    path: Path
    data: bytes
    width: int | None
    height: int | None
    error: str | None


CHECK_FLOOR = (1, 1)  # a JPEG is checked at libjpeg's smallest scale (1/8)


def read_image(image_id: int, path: Path, max_pixels: int) -> ImageFile:
    """Read and decode one file (decoding checks it; its header, else the decoded image, gives
    its displayed size); never raises for a bad image. A JPEG is decoded at 1/8 scale, which
    still runs the entropy decoder over the whole file (a 3,000-pixel photograph: 15 ms instead
    of 32 in full); an image declaring more than `max_pixels` is bad, undecoded."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # gone since it was listed, or unreadable
        return ImageFile(image_id, path, b"", None, None, f"cannot read {path}: {exc.strerror or exc}")
    try:
        image = decode(data, CHECK_FLOOR, max_pixels)
    except PermanentError as exc:
        return ImageFile(image_id, path, b"", None, None, str(exc))
    header = read_header(data)
    width, height = (header.width, header.height) if header else (image.shape[1], image.shape[0])
    return ImageFile(image_id, path, data, width, height, None)


class ShardWriter:
    """A tar being written to a temporary file, with where each member's data landed."""

    def __init__(self) -> None:
        self.file = tempfile.NamedTemporaryFile(prefix="quarry-pack-", suffix=".tar")  # noqa: SIM115
        self.tar = TarWriter(self.file)
        self.members: list[Member] = []

    def add(self, image: ImageFile) -> None:
        offset = self.tar.add(f"{image.image_id}{image.path.suffix.lower()}", image.data)
        self.members.append(Member(image.image_id, offset, len(image.data), image.width, image.height))

    @property
    def full(self) -> bool:
        return len(self.members) >= SHARD_MAX_IMAGES or self.tar.offset >= SHARD_MAX_BYTES

    def close(self) -> str:
        """End the archive; the temporary file's path (removed by `discard`)."""
        self.tar.close()
        self.file.flush()
        return self.file.name

    def discard(self) -> None:
        self.file.close()


def pack_images(
    conn: psycopg.Connection,
    store: ObjectStore,
    dataset: Dataset,
    files: Iterable[tuple[int, Path]],
    bucket: str,
    concurrency: int,
    summary: IngestSummary,
    on_progress: Callable[[IngestSummary], None],
) -> None:
    """Pack the images not registered yet into shards under `s3://bucket/packed/{dataset}/`;
    each shard's images are registered in one transaction once it is stored, so an interrupted
    run resumes with the images of its unfinished shard. Unreadable files and images past
    IMAGE_MAX_PIXELS are recorded (their items fail) and read again by the next run."""
    prefix = f"packed/{dataset.name}/{uuid.uuid4().hex[:12]}"  # this run's shards
    max_pixels = store.settings.image_max_pixels
    writer: ShardWriter | None = None
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="pack") as pool:
        for batch in batched(files, FILES_PER_BATCH):
            known = registered_sizes(conn, dataset, [image_id for image_id, _ in batch])
            todo = [(image_id, path) for image_id, path in batch if changed_or_new(known, image_id, path)]
            summary.present += len(batch) - len(todo)
            summary.replaced += sum(image_id in known for image_id, _ in todo)
            bad = {}
            for image in pool.map(lambda item: read_image(item[0], item[1], max_pixels), todo):
                if image.error is not None:
                    bad[image.image_id] = image.error
                    log.warning("bad image %s: %s", image.path, image.error)
                    continue
                writer = writer or ShardWriter()
                writer.add(image)
                if writer.full:
                    store_shard(conn, store, dataset, writer, f"s3://{bucket}/{prefix}", summary)
                    writer = None
            if bad:
                with conn.transaction():
                    add_bad_images(conn, dataset, bad)
                summary.bad += len(bad)
            on_progress(summary)
    if writer is not None:
        store_shard(conn, store, dataset, writer, f"s3://{bucket}/{prefix}", summary)
        on_progress(summary)


def store_shard(
    conn: psycopg.Connection,
    store: ObjectStore,
    dataset: Dataset,
    writer: ShardWriter,
    prefix: str,
    summary: IngestSummary,
) -> None:
    """Upload a finished shard as `{prefix}/{NNNNN}.tar`, then register it and its images together."""
    uri = f"{prefix}/{summary.shards:05d}.tar"
    bucket, key = parse_s3_uri(uri)
    try:
        store.upload_file(writer.close(), bucket, key, content_type="application/x-tar")
    finally:
        writer.discard()
    size, etag = store.head(bucket, key)
    with conn.transaction():
        shard = add_shard(conn, uri, size, etag)
        conn.execute(  # the images of changed files: their new bytes replace the old
            "DELETE FROM locations WHERE dataset = %s AND id = ANY (%s) AND error IS NULL",
            (dataset.id, [member.match for member in writer.members]),
        )
        load_members(conn, dataset, writer.members)
        added = add_member_locations(conn, dataset, shard)
    summary.images += added
    summary.packed += added
    summary.shards += 1


def registered_sizes(
    conn: psycopg.Connection, dataset: Dataset, image_ids: list[int]
) -> dict[int, int | None]:
    """The ids that already have an image (not a recorded failure), with its size in bytes."""
    rows = conn.execute(
        "SELECT id, byte_length FROM locations WHERE dataset = %s AND id = ANY (%s) AND error IS NULL",
        (dataset.id, image_ids),
    ).fetchall()
    return {row[0]: row[1] for row in rows}


def changed_or_new(known: dict[int, int | None], image_id: int, path: Path) -> bool:
    """Whether a file is to be packed: not registered yet, or of another size than the image
    registered under its id (the file changed since: it is packed again and replaces it)."""
    if image_id not in known:
        return True
    size = known[image_id]
    return size is not None and path.stat().st_size != size


def forget_lost_shards(conn: psycopg.Connection, store: ObjectStore, dataset: Dataset) -> int:
    """Drop the locations in shards that are gone or were rewritten (a wiped or replaced raw
    bucket), so that packing them again is what a re-run does; how many shards were lost. One
    HEAD per shard."""
    shards = conn.execute(
        "SELECT s.id, s.uri, s.etag FROM shards s WHERE EXISTS"
        " (SELECT FROM locations l WHERE l.dataset = %s AND l.shard = s.id)",
        (dataset.id,),
    ).fetchall()
    lost = []
    for shard, uri, etag in shards:
        try:
            _, now = store.head(*parse_s3_uri(uri))
        except PermanentError:
            now = None
        if now != etag:
            lost.append(shard)
            log.warning("shard %s is gone or was rewritten: its images are packed again", uri)
    if lost:
        with conn.transaction():
            conn.execute("DELETE FROM locations WHERE dataset = %s AND shard = ANY (%s)", (dataset.id, lost))
    return len(lost)
