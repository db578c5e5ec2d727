"""Train a copy-detection embedding: an image and its altered copies (re-encoded at low JPEG
quality, shrunk and enlarged, cropped a few percent a side, brightness and contrast shifted) land
close together, other images, look-alikes included, far apart (the approach of SSCD: contrastive
learning with exactly the alterations a copy survives as positives). Export to ONNX with the
embedding as its output (docs/content.md, "Near-duplicates").

Usage: python -m training.copies [DATASET ...] [--out PATH] [--epochs N]
Needs the training extra (torch, onnx). Batches are drawn within groups of the same article type
and colour, so each batch holds look-alikes as negatives.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from common.catalog import CatalogStats, RejectedLine, read_styles
from common.model import EMBEDDING_KEY
from common.paths import MODELS_DIR
from training.train import PREPROCESS  # the classifier's input: the two graphs share it

DIMENSIONS = 128
TEMPERATURE = 0.05
SEED = 11


def alter(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """One random copy of a BGR image: each alteration with some probability, in a copier's order."""
    h, w = image.shape[:2]
    if rng.random() < 0.6:  # crop 0-8 % of each side
        top, bottom = (round(rng.uniform(0, 0.08) * h) for _ in range(2))
        left, right = (round(rng.uniform(0, 0.08) * w) for _ in range(2))
        image = image[top : h - bottom, left : w - right]
    if rng.random() < 0.6:  # contrast and brightness
        image = cv2.convertScaleAbs(image, alpha=rng.uniform(0.7, 1.3), beta=rng.uniform(-35, 35))
    if rng.random() < 0.5:  # shrunk and enlarged back
        scale = rng.uniform(0.3, 0.8)
        ih, iw = image.shape[:2]
        small = cv2.resize(
            image, (max(1, round(iw * scale)), max(1, round(ih * scale))), interpolation=cv2.INTER_AREA
        )
        image = cv2.resize(small, (iw, ih), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.6:  # re-encoded
        _, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, rng.randint(10, 60)])
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return image


def block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)
    )


class CopyNet(nn.Module):
    """80 x 60 RGB to a unit vector of DIMENSIONS: the image standardised, convolutions down to
    5 x 4 cells, whose layout is kept (a copy keeps where things are), then one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            block(3, 32, 2),  # 40 x 30
            block(32, 32, 1),
            block(32, 64, 2),  # 20 x 15
            block(64, 64, 1),
            block(64, 128, 2),  # 10 x 8
            block(128, 128, 2),  # 5 x 4
        )
        self.project = nn.Linear(128 * 5 * 4, DIMENSIONS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # each image standardised over all its values first: a copy whose brightness and contrast
        # were shifted (x * a + b, the same for every channel) gives the same input, up to clipping
        mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
        spread = pixels.std(dim=(1, 2, 3), keepdim=True) + 1e-3
        vector = self.project(torch.flatten(self.features((pixels - mean) / spread), 1))
        return nn.functional.normalize(vector, dim=1)


def load_images(datasets: list[Path]) -> tuple[list[np.ndarray], list[str]]:
    """Every image with a styles.csv row, and its look-alike group (article type and colour)."""
    images, groups = [], []
    for dataset in datasets:
        for row in read_styles(dataset / "styles.csv", CatalogStats()):
            if isinstance(row, RejectedLine):
                continue
            path = dataset / "images" / f"{row[0]}.jpg"
            image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
            if image is not None:
                images.append(image)
                groups.append(f"{row[4]}|{row[5]}")
    return images, groups


def batches(groups: list[str], size: int, rng: random.Random) -> list[list[int]]:
    """Index batches, each filled from a few look-alike groups in turn."""
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    ordered = list(members.values())
    rng.shuffle(ordered)
    for indices in ordered:
        rng.shuffle(indices)
    flat = [index for indices in ordered for index in indices]
    chunks = [flat[start : start + size] for start in range(0, len(flat), size)]
    rng.shuffle(chunks)
    return [chunk for chunk in chunks if len(chunk) > 1]


def tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(PREPROCESS.tensor(images))


def contrastive_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """NT-Xent: each view's positive is the other view of its image; every other view is a negative."""
    views = torch.cat([first, second])
    similarity = views @ views.T / TEMPERATURE
    similarity.fill_diagonal_(float("-inf"))
    n = first.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return nn.functional.cross_entropy(similarity, targets)


def train(images: list[np.ndarray], groups: list[str], epochs: int, batch_size: int) -> CopyNet:
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    model = CopyNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * len(batches(groups, batch_size, random.Random(0)))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        started, total, count = time.monotonic(), 0.0, 0
        model.train()
        for batch in batches(groups, batch_size, rng):
            first = tensor([alter(images[i], rng) for i in batch])
            second = tensor([alter(images[i], rng) for i in batch])
            loss = contrastive_loss(model(first), model(second))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total, count = total + float(loss.detach()) * len(batch), count + len(batch)
        seconds = time.monotonic() - started
        print(f"epoch {epoch + 1}/{epochs}: loss {total / count:.4f} ({seconds:.0f} s)", flush=True)
    return model.eval()


def export(model: CopyNet, classifier: Path, out: Path) -> None:
    """One ONNX model: the classifier's graph unchanged (its labels, scores and metadata) beside
    the copy network's, both reading the same input; its embedding output is the copy network's.
    So `producer run --model fashion-copies` classifies as the shipped model does and records
    copy descriptors as its embeddings (docs/content.md)."""
    import onnx

    scratch = out.with_suffix(".copy-only.onnx")
    example = torch.zeros(1, 3, PREPROCESS.height, PREPROCESS.width)
    torch.onnx.export(
        model,
        (example,),
        str(scratch),
        input_names=["image"],
        output_names=["embedding"],
        dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    copy = onnx.compose.add_prefix(onnx.load(str(scratch)), "copy/")
    scratch.unlink()
    combined = onnx.load(str(classifier))
    graph, shared = combined.graph, combined.graph.input[0].name
    for node in copy.graph.node:
        node.input[:] = [shared if name == copy.graph.input[0].name else name for name in node.input]
    graph.node.extend(copy.graph.node)
    graph.initializer.extend(copy.graph.initializer)
    outputs = [graph.output[0], copy.graph.output[0]]  # the logits; the copy descriptor
    del graph.output[:]
    graph.output.extend(outputs)
    for prop in combined.metadata_props:
        if prop.key == EMBEDDING_KEY:
            prop.value = copy.graph.output[0].name
    onnx.checker.check_model(combined)
    onnx.save(combined, str(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("datasets", nargs="*", type=Path, default=[Path("../shared/fashion-train")])
    parser.add_argument("--out", type=Path, default=MODELS_DIR / "fashion-copies.onnx")
    parser.add_argument("--classifier", type=Path, default=MODELS_DIR / "fashion-classifier.onnx")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cv2.setNumThreads(1)
    images, groups = load_images(args.datasets)
    print(f"{len(images)} images in {len(set(groups))} look-alike groups", flush=True)
    model = train(images, groups, args.epochs, args.batch_size)
    export(model, args.classifier, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
