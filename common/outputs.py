"""A model's outputs computed once (docs/content.md): label, score, top-k and embedding of each
image the model read, kept in `model_outputs` under the sha256 of the model file and of the
image's bytes. A job whose model already read the same bytes takes them from there; the model
runs on the rest, and what it computes is added."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from common.model import Prediction

Lookup = Callable[[list[bytes]], dict[bytes, Prediction]]


def image_digest(data: bytes | memoryview) -> bytes:
    """The key of an image's bytes."""
    return hashlib.sha256(data).digest()


@dataclass
class OutputCache:
    """One batch's view of the cache: what it finds (through `lookup`, a catalog read) and what
    the model computed meanwhile (`new`, for the caller to store with `store_outputs`)."""

    lookup: Lookup
    top_k: int
    labels: int  # the model's: a cached top-k shorter than min(top_k, labels) is not enough
    new: dict[bytes, Prediction] = field(default_factory=dict)

    def find(self, digests: Iterable[bytes]) -> dict[bytes, Prediction]:
        """The cached outputs of these images, their top-k cut to this job's."""
        wanted = min(self.top_k, self.labels)
        found = self.lookup(list(dict.fromkeys(digests)))
        return {
            digest: Prediction(p.label, p.score, p.top_k[:wanted], p.embedding)
            for digest, p in found.items()
            if len(p.top_k) >= wanted
        }


def no_cache(digests: list[bytes]) -> dict[bytes, Prediction]:
    """A lookup that finds nothing (a model run without a catalog: the preview, the benches)."""
    return {}


def cached_outputs(
    conn: psycopg.Connection, model: bytes, images: Sequence[bytes]
) -> dict[bytes, Prediction]:
    """The outputs recorded for these images under this model."""
    if not images:
        return {}
    rows = conn.execute(
        "SELECT image, label, score, top_k, embedding FROM model_outputs"
        " WHERE model = %s AND image = ANY(%s)",
        (model, list(images)),
    ).fetchall()
    return {
        bytes(image): Prediction(label, float(score), top_k, embedding)
        for image, label, score, top_k, embedding in rows
    }


def store_outputs(conn: psycopg.Connection, model: bytes, outputs: Mapping[bytes, Prediction]) -> None:
    """Add what the model computed (an image already there keeps its row: same model, same bytes)."""
    if not outputs:
        return
    items = list(outputs.items())
    conn.execute(
        "INSERT INTO model_outputs (model, image, label, score, top_k, embedding)"
        " SELECT %s, i, l, s, k, CASE WHEN e IS NULL THEN NULL ELSE e::real[] END"
        " FROM unnest(%s::bytea[], %s::text[], %s::real[], %s::jsonb[], %s::text[]) AS r (i, l, s, k, e)"
        " ON CONFLICT (model, image) DO NOTHING",
        (
            model,
            [digest for digest, _ in items],
            [p.label for _, p in items],
            [p.score for _, p in items],
            [json.dumps(p.top_k) for _, p in items],
            [None if p.embedding is None else "{" + ",".join(map(repr, p.embedding)) + "}" for _, p in items],
        ),
    )


def predict_once(
    keys: Sequence[Hashable],
    digests: Mapping[Hashable, bytes],
    cache: OutputCache,
    run_model: Callable[[list[Hashable]], dict[Hashable, Any]],
) -> tuple[dict[Hashable, Any], set[Hashable]]:
    """Each key's output: from the cache where its image's digest is there, else from
    `run_model` (called once, with the keys left; it returns a Prediction or an error for each).
    Returns the outputs and the keys the model ran on; the model's predictions join `cache.new`."""
    found = cache.find(digests[key] for key in keys if key in digests)
    outputs: dict[Hashable, Any] = {}
    left: list[Hashable] = []
    for key in keys:
        digest = digests.get(key)
        if digest is not None and digest in found:
            outputs[key] = found[digest]
        else:
            left.append(key)
    computed = run_model(left) if left else {}
    for key, output in computed.items():
        outputs[key] = output
        if isinstance(output, Prediction) and key in digests:
            cache.new.setdefault(digests[key], output)
    return outputs, {key for key, output in computed.items() if isinstance(output, Prediction)}
