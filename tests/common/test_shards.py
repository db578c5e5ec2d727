"""Shard bytes, keys and the CLI's shard options, as pure units."""

import io
import tarfile

import pytest

from common.config import Settings
from common.errors import UserError
from common.jobspec import JobSpec, output_key
from common.shards import Sample, Shard, read_tar, write_tar
from quarry.client import DEFAULT_SHARD_SIZE, job_chunk_size


def shard(order: list[int]) -> Shard:
    samples = {
        0: Sample(7, 0, 0, {"catalog": None, "seed": 1}, b"\xff\xd8a", ".jpg"),
        1: Sample(7, 1, 1, {"catalog": None, "seed": 1, "error": "transform: no image"}),
        2: Sample(9, 0, 2, {"catalog": {"gender": "Men"}, "seed": 1}, b"\x89PNG", ".png"),
    }
    return Shard(samples=[samples[i] for i in order], raws={9: (".jpg", b"raw9"), 7: (".jpg", b"raw7")})


def test_a_shard_is_the_same_bytes_whatever_order_its_samples_came_in() -> None:
    assert write_tar(shard([0, 1, 2])) == write_tar(shard([2, 0, 1]))


def test_members_are_in_slot_order_with_fixed_owner_and_time() -> None:
    with tarfile.open(fileobj=io.BytesIO(write_tar(shard([2, 1, 0]))), mode="r:") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "7-0.jpg",
        "7-0.json",
        "7-1.json",
        "9-0.png",
        "9-0.json",
        "_raw/7.jpg",
        "_raw/9.jpg",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_a_staging_shard_reads_back_with_slots_and_raws() -> None:
    back = read_tar(write_tar(shard([0, 1, 2]), staging=True))
    assert [(s.image_id, s.variant, s.slot, s.image, s.extension) for s in back.samples] == [
        (7, 0, 0, b"\xff\xd8a", ".jpg"),
        (7, 1, 1, None, ".jpg"),
        (9, 0, 2, b"\x89PNG", ".png"),
    ]
    assert back.samples[1].record["error"] == "transform: no image"
    assert back.raws == {7: (".jpg", b"raw7"), 9: (".jpg", b"raw9")}


def test_hashed_keys_spread_over_256_prefixes_and_stay_deterministic() -> None:
    keys = {output_key("job", image_id, 0, ".jpg", "hashed") for image_id in range(5000)}
    assert len({key.split("/")[1] for key in keys}) == 256
    assert output_key("job", 42, 1, ".jpg", "hashed") == output_key("job", 42, 1, ".jpg", "hashed")
    assert output_key("job", 42, 1, ".jpg") == "job/42-1.jpg"


@pytest.mark.parametrize(
    ("output", "chunk_size", "shard_size", "layout", "expected"),
    [
        ("files", None, None, "flat", 100),
        ("files", 7, None, "hashed", 7),
        ("webdataset", None, None, "flat", DEFAULT_SHARD_SIZE),
        ("webdataset", 50, None, "flat", 50),
        ("webdataset", None, 64, "flat", 64),
        ("files", None, 64, "flat", "--shard-size applies to --output webdataset only"),
        ("webdataset", 50, 64, "flat", "--chunk-size and --shard-size disagree"),
        ("webdataset", None, None, "hashed", "--key-layout applies to --output files only"),
    ],
)
def test_shard_size_is_the_chunk_size_of_a_webdataset_job(
    output: str, chunk_size: int | None, shard_size: int | None, layout: str, expected: int | str
) -> None:
    spec = JobSpec(job_id="j", output=output, key_layout=layout)  # type: ignore[arg-type]
    settings = Settings(chunk_size=100)
    if isinstance(expected, str):
        with pytest.raises(UserError, match=expected):
            job_chunk_size(spec, chunk_size, shard_size, settings)
    else:
        assert job_chunk_size(spec, chunk_size, shard_size, settings) == expected
