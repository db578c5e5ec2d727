"""WebDataset output: one tar shard per chunk, byte-deterministic, with a per-shard manifest.

A shard holds, for each item of its chunk in slot order, `{image_id}-{variant}.{ext}` (the
rendered image, when it rendered) and `{image_id}-{variant}.json` (catalog fields, the spec, the
prediction or the error). Fixed mtime, owner and mode, and a fixed member order, make a rerun of
the same chunk write the same bytes, so a re-dispatched chunk overwrites its shard with itself.

Beside each shard: `{name}_stats.json` (counts, failures by error, seconds) and `{name}.parquet`
(one row per item). With a model, transform writes a staging shard under `_staging/` that also
carries the raw images when the model reads raws; inference reads it once, writes the final
shard and the manifest, and deletes it.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.images import ENCODINGS, sniff_format
from common.jobspec import JobSpec
from common.ledger import ItemResult
from common.storage import ObjectStore
from common.tarball import TarWriter, members
from common.transform import TransformResult

RAW_PREFIX = "_raw/"  # staging-only members: the raw images a model reads with --infer-on raw


def shard_name(job_id: str, chunk: int) -> str:
    return f"{job_id}-{chunk:06d}"


def shard_key(job_id: str, chunk: int, *, staging: bool = False) -> str:
    """`{job}/shards/{job}-{NNNNNN}.tar`; the staging copy lives under `{job}/shards/_staging/`."""
    folder = f"{job_id}/shards/_staging" if staging else f"{job_id}/shards"
    return f"{folder}/{shard_name(job_id, chunk)}.tar"


@dataclass
class Sample:
    """One item of a shard: its image (absent when it failed) and its JSON record."""

    image_id: int
    variant: int
    slot: int
    record: dict[str, Any]
    image: bytes | None = None
    extension: str = ".jpg"

    @property
    def key(self) -> str:
        return f"{self.image_id}-{self.variant}"

    @property
    def image_member(self) -> str | None:
        return f"{self.key}{self.extension}" if self.image is not None else None

    def result(self, uri: str) -> ItemResult:
        """The ledger's view of this sample, once its shard is stored at `uri`."""
        error = self.record.get("error")
        return ItemResult(
            self.image_id,
            self.variant,
            self.slot,
            "failed" if error else "done",
            output_uri=f"{uri}#{self.image_member}" if self.image_member else None,
            error=error,
            label=self.record.get("label"),
            score=self.record.get("score"),
            top_k=self.record.get("top_k"),
        )


@dataclass
class Shard:
    """A chunk's samples, plus (staging only) the raw images keyed by image id."""

    samples: list[Sample] = field(default_factory=list)
    raws: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # id -> (extension, bytes)


def record_for(spec: JobSpec, catalog: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON fields every sample of a job shares, before its own outcome is added."""
    return {
        "catalog": catalog,
        "job_id": spec.job_id,
        "augment": spec.augment,
        "seed": spec.seed,
    }


def shard_from_transform(spec: JobSpec, result: TransformResult, catalog: dict[int, dict[str, Any]]) -> Shard:
    """Every item of a rendered chunk as a sample: rendered ones with their image, failed ones
    with their error; the raws a model will read when it classifies raw images."""
    shard = Shard()
    for output in result.outputs:
        record = record_for(spec, catalog.get(output.image_id))
        shard.samples.append(
            Sample(output.image_id, output.variant, output.slot, record, output.data, output.extension)
        )
    for failure in result.failures:
        record = {**record_for(spec, catalog.get(failure.image_id)), "error": failure.error}
        shard.samples.append(Sample(failure.image_id, failure.variant, failure.slot, record))
    if spec.model and spec.infer_on == "raw":
        shard.raws = {
            image_id: (ENCODINGS[sniff_format(data)][0], data) for image_id, (_, data) in result.raws.items()
        }
    return shard


def dump_json(value: Any) -> bytes:
    """Compact, sorted JSON; values JSON has no type for (dates, decimals of a user's catalog) as text."""
    return _JSON.encode(value).encode()


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)  # made once: json.dumps
# with options makes an encoder per call, a tenth of a sample's JSON time


def write_tar(shard: Shard, *, staging: bool = False) -> bytes:
    """The shard as tar bytes: samples in slot order, each image before its JSON. A staging
    shard's records also carry each item's slot (its place in the chunk's bitmaps)."""
    buffer = io.BytesIO()
    tar = TarWriter(buffer)
    for sample in sorted(shard.samples, key=lambda s: s.slot):
        if sample.image is not None:
            tar.add(f"{sample.key}{sample.extension}", sample.image)
        record = {**sample.record, "id": sample.image_id, "variant": sample.variant}
        if staging:
            record["slot"] = sample.slot
        tar.add(f"{sample.key}.json", dump_json(record))
    for image_id in sorted(shard.raws):
        extension, data = shard.raws[image_id]
        tar.add(f"{RAW_PREFIX}{image_id}{extension}", data)
    tar.close()
    return buffer.getvalue()


def read_tar(data: bytes) -> Shard:
    """A shard written by `write_tar` (staging or final) back into samples and raws."""
    files = dict(members(data))
    shard = Shard()
    images = {name.split(".", 1)[0]: name for name in files if not name.endswith(".json")}
    for slot, name in enumerate(n for n in files if n.endswith(".json")):
        record = json.loads(files[name])
        key = name[: -len(".json")]
        image_name = images.get(key)
        shard.samples.append(
            Sample(
                int(record.pop("id")),
                int(record.pop("variant")),
                int(record.pop("slot", slot)),
                record,
                files[image_name] if image_name else None,
                "." + image_name.split(".", 1)[1] if image_name else ".jpg",
            )
        )
    for name, payload in files.items():
        if name.startswith(RAW_PREFIX):
            stem, extension = name[len(RAW_PREFIX) :].split(".", 1)
            shard.raws[int(stem)] = ("." + extension, payload)
    return shard


def store_shard(
    store: ObjectStore, bucket: str, spec: JobSpec, chunk: int, shard: Shard, seconds: float
) -> list[ItemResult]:
    """Put the final shard and its manifest; the items' results, to record in the ledger."""
    name = shard_name(spec.job_id, chunk)
    key = shard_key(spec.job_id, chunk)
    store.put(
        bucket, key, write_tar(shard), content_type="application/x-tar", metadata={"job-id": spec.job_id}
    )
    results = [sample.result(f"s3://{bucket}/{key}") for sample in shard.samples]
    folder = key.rsplit("/", 1)[0]
    manifest = {
        f"{name}_stats.json": (dump_json(stats(name, results, seconds)), "application/json"),
        f"{name}.parquet": (
            parquet_bytes(manifest_rows(name, shard.samples)),
            "application/vnd.apache.parquet",
        ),
    }
    for file_name, (data, content_type) in manifest.items():
        store.put(bucket, f"{folder}/{file_name}", data, content_type=content_type, metadata={})
    return results


def stats(name: str, results: Sequence[ItemResult], seconds: float) -> dict[str, Any]:
    """The shard's `_stats.json`: counts and failures by error."""
    failures = Counter(r.error or "" for r in results if r.status == "failed")
    return {
        "shard": f"{name}.tar",
        "items": len(results),
        "done": sum(r.status == "done" for r in results),
        "failed": sum(failures.values()),
        "failures_by_error": dict(sorted(failures.items())),
        "seconds": round(seconds, 3),
    }


def manifest_rows(name: str, samples: Iterable[Sample]) -> Iterator[dict[str, Any]]:
    """One row per item for the shard's parquet manifest."""
    for sample in sorted(samples, key=lambda s: s.slot):
        yield {
            "image_id": sample.image_id,
            "variant": sample.variant,
            "shard": f"{name}.tar",
            "member": sample.image_member,
            "status": "failed" if sample.record.get("error") else "done",
            "error": sample.record.get("error"),
            "label": sample.record.get("label"),
            "score": sample.record.get("score"),
        }


def parquet_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows of `manifest_rows` as a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows), schema=manifest_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def manifest_schema() -> Any:
    """The parquet manifest's columns (pyarrow is imported only where parquet is written)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("variant", pa.int32()),
            ("shard", pa.string()),
            ("member", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("label", pa.string()),
            ("score", pa.float32()),
        ]
    )
