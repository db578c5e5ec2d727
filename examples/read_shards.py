"""Train-side reading of a Quarry WebDataset job with PyTorch.

    aws s3 cp --recursive s3://quarry-output/JOB/shards/ shards/   # or any S3 client
    python examples/read_shards.py shards/

Needs `pip install torch webdataset` (and opencv-python-headless). Shards can also be streamed
without copying them, e.g.
`wds.WebDataset("pipe:aws s3 cp s3://quarry-output/JOB/shards/JOB-{000000..000009}.tar -")`.
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds


def to_tensor(data: bytes) -> torch.Tensor:
    """JPEG bytes -> float CHW RGB in [0, 1] (OpenCV, which Quarry already depends on)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255


def article_type(data: bytes) -> str:
    catalog = json.loads(data)["catalog"]
    return catalog["article_type"] if catalog else ""


def has_image(sample: dict) -> bool:
    return "jpg" in sample  # a failed item is a JSON record only


def loader(shard_dir: Path, batch_size: int = 64) -> torch.utils.data.DataLoader:
    urls = sorted(str(path) for path in shard_dir.glob("*.tar"))
    dataset = (
        wds.WebDataset(urls, shardshuffle=False)
        .select(has_image)
        .to_tuple("jpg", "json")
        .map_tuple(to_tensor, article_type)
        .batched(batch_size, partial=True)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0)


if __name__ == "__main__":
    images, shape, example = 0, (), ""
    for pixels, article_types in loader(Path(sys.argv[1])):
        images, shape, example = images + len(article_types), tuple(pixels.shape), article_types[0]
    print(f"read {images} images; last batch {shape}, e.g. {example!r}")
