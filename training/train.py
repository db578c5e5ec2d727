"""Train the fashion classifier and export it to ONNX with Quarry's metadata (`make model`).

Usage: python -m training.train [DATASET ...] [--out models/fashion-classifier.onnx] [--epochs N]
Needs the training extra (torch, onnx); serving needs only onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from common.config import get_settings
from common.model import HIERARCHY_KEY, LABELS_KEY, PREPROCESS_KEY, Preprocess
from training.dataset import is_held_out, label_set, load_examples, load_pixels
from training.embedding_output import add_embedding_output
from training.evaluate import evaluate_onnx, write_card

PREPROCESS = Preprocess(
    height=80,
    width=60,
    resize="letterbox",
    pad=255,
    channel_order="RGB",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)
SEED = 7


def block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)
    )


def build_model(classes: int) -> nn.Module:
    """A small CNN sized for >1,000 images/s on two CPU cores at 80x60."""
    return nn.Sequential(
        block(3, 32, 2),
        block(32, 32, 1),  # 40x30
        block(32, 64, 2),
        block(64, 64, 1),  # 20x15
        block(64, 128, 2),
        block(128, 128, 1),  # 10x8
        block(128, 256, 2),  # 5x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(256, classes),
    )


def augment(batch: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 4 pixels (white fill), on the fly."""
    flip = torch.rand(batch.shape[0]) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    padded = nn.functional.pad(batch, (4, 4, 4, 4), value=1.0)
    dy, dx = (int(v) for v in torch.randint(0, 9, (2,)))
    return padded[:, :, dy : dy + batch.shape[2], dx : dx + batch.shape[3]]


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(PREPROCESS.mean).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS.std).view(1, 3, 1, 1)
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def train(datasets: list[Path], out: Path, epochs: int) -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    examples = load_examples(datasets)
    train_set = [e for e in examples if not is_held_out(e.image_id)]
    test_set = [e for e in examples if is_held_out(e.image_id)]
    labels, hierarchy, mapping = label_set(train_set)
    index = {label: i for i, label in enumerate(labels)}
    inputs = to_tensor(load_pixels(train_set, PREPROCESS))
    targets = torch.tensor([index[mapping[e.article_type]] for e in train_set])
    print(f"{len(train_set)} training images, {len(test_set)} held out, {len(labels)} labels")

    model = build_model(len(labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = epochs * ((len(train_set) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    loss_function = nn.CrossEntropyLoss(label_smoothing=0.1)
    started = time.monotonic()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_set))
        total = 0.0
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = loss_function(model(augment(inputs[batch])), targets[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss) * len(batch)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.3f} ({time.monotonic() - started:.0f} s)"
        )

    seconds = time.monotonic() - started
    export(model.eval(), labels, hierarchy, out)
    report = evaluate_onnx(out, test_set, mapping)
    sources = {str(d): sum(e.folder == d for e in examples) for d in datasets}
    write_card(
        out.with_suffix(".md"), report, len(train_set), len(test_set), labels, epochs, sources, seconds
    )
    print(json.dumps({k: report[k] for k in ("top1", "top5", "master_top1", "raw_top1")}))


def export(model: nn.Module, labels: list[str], hierarchy: dict[str, list[str]], out: Path) -> None:
    """ONNX with a dynamic batch axis and Quarry's metadata_props."""
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, PREPROCESS.height, PREPROCESS.width)
    torch.onnx.export(
        model,
        (example,),
        str(out),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(out))
    for key, value in (
        (LABELS_KEY, json.dumps(labels)),
        (PREPROCESS_KEY, PREPROCESS.to_json()),
        (HIERARCHY_KEY, json.dumps(hierarchy)),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    add_embedding_output(proto)  # the penultimate layer, for `embeddings` (docs/content.md)
    onnx.save(proto, str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", type=Path, help="dataset folders (default: DATASET_PATH)")
    parser.add_argument("--out", type=Path, default=Path("models/fashion-classifier.onnx"))
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(2)
    train(args.datasets or [get_settings().dataset_path], args.out, args.epochs)


if __name__ == "__main__":
    main()
