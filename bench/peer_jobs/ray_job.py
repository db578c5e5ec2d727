"""The job in Ray Data: read_parquet -> filter -> map_batches with an actor per core (boto3 GET,
OpenCV decode/resize/encode, boto3 PUT), one object per image at `{out}/{id}.jpg`. Prints
{"images": N, "seconds": S}; Ray's start-up is not counted.

Run by bench.peers with the peers' environment: python bench/peer_jobs/ray_job.py CONFIG_JSON
"""

import json
import os
import sys
import time

import boto3
import cv2
import numpy as np
import pyarrow.fs
import ray


class Render:
    """GET, decode, resize, encode, PUT: one actor per core, one boto3 client each."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.s3 = boto3.client(
            "s3",
            endpoint_url=config["endpoint"],
            aws_access_key_id=config["key"],
            aws_secret_access_key=config["secret"],
            region_name="us-east-1",
        )

    def __call__(self, batch: dict) -> dict:
        side, (bucket, prefix) = self.config["side"], self.config["out"][5:].split("/", 1)
        for image_id, uri in zip(batch["id"], batch["uri"], strict=True):
            source_bucket, key = uri[5:].split("/", 1)
            raw = self.s3.get_object(Bucket=source_bucket, Key=key)["Body"].read()
            image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
            small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
            jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
            self.s3.put_object(Bucket=bucket, Key=f"{prefix}/{image_id}.jpg", Body=jpeg)
        return {"id": batch["id"]}


def main() -> None:
    config = json.loads(sys.argv[1])
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    filesystem = pyarrow.fs.S3FileSystem(
        access_key=config["key"],
        secret_key=config["secret"],
        endpoint_override=config["endpoint"],
        scheme="http",
        region="us-east-1",
    )
    started = time.perf_counter()
    categories = set(config["categories"])
    rows = (
        ray.data.read_parquet(config["manifest"].removeprefix("s3://"), filesystem=filesystem)
        .filter(lambda row: row["master_category"] in categories)
        # half a CPU per actor: on few cores the read task must still get a slot
        .map_batches(Render, fn_constructor_args=(config,), concurrency=cores, num_cpus=0.5, batch_size=64)
    )
    images = rows.count()
    print(json.dumps({"images": images, "seconds": time.perf_counter() - started}))
    ray.shutdown()


if __name__ == "__main__":
    main()
