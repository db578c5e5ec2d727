"""Inference-stage throughput of a model at batch 1, 32 and 256, beside the preprocessing cost.

Run: python -m bench.inference [DATASET] [--model PATH] [--provider NAME]
(NAME: CPUExecutionProvider or CUDAExecutionProvider; refused if the session falls back.)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial
from pathlib import Path

from common.images import decode
from common.model import Classifier
from common.paths import MODELS_DIR, default_dataset_path


def rate(function, items: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return items * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", nargs="?", type=Path, default=default_dataset_path())
    parser.add_argument("--model", type=Path, default=MODELS_DIR / "fashion-classifier.onnx")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    args = parser.parse_args()
    classifier = Classifier(args.model, providers=[args.provider])
    if classifier.provider != args.provider:
        raise SystemExit(f"asked for {args.provider}, session runs on {classifier.provider}")
    paths = sorted((args.dataset / "images").glob("*.jpg"))[:256]
    images = [decode(path.read_bytes()) for path in paths]
    images = (images * (256 // len(images) + 1))[:256]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"provider {classifier.provider}; model {args.model.name}"
    )
    print(f"{'batch':>6} {'preprocess img/s':>17} {'model img/s':>12} {'stage img/s':>12}")
    for batch in (1, 32, 256):
        chunk = images[:batch]
        tensor = classifier.info.preprocess.tensor(chunk)
        repeats = max(3, 2048 // batch)
        pre = rate(partial(classifier.info.preprocess.tensor, chunk), batch, repeats)
        model = rate(partial(classifier.logits, tensor), batch, repeats)
        stage = rate(partial(classifier.predict, chunk), batch, repeats)
        print(f"{batch:>6} {pre:>17.0f} {model:>12.0f} {stage:>12.0f}")


if __name__ == "__main__":
    main()
