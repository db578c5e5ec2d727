"""The job in Daft (native runner): read_parquet -> where -> download -> decode -> resize ->
encode -> upload, one object per image at `{out}/{id}.jpg`. Prints {"images": N, "seconds": S}.

Run by bench.peers with the peers' environment: python bench/peer_jobs/daft_job.py CONFIG_JSON
"""

import json
import sys
import time

import daft
from daft import col, lit
from daft.io import IOConfig, S3Config


def main() -> None:
    config = json.loads(sys.argv[1])
    io = IOConfig(
        s3=S3Config(
            endpoint_url=config["endpoint"],
            key_id=config["key"],
            access_key=config["secret"],
            region_name="us-east-1",
            force_virtual_addressing=False,
        )
    )
    started = time.perf_counter()
    frame = (
        daft.read_parquet(config["manifest"], io_config=io)
        .where(col("master_category").is_in(config["categories"]))
        .with_column("raw", col("uri").download(io_config=io))
        .with_column("image", col("raw").decode_image())
        .with_column("small", col("image").resize(config["side"], config["side"]))
        .with_column("jpeg", col("small").encode_image("JPEG"))
        .with_column("key", lit(config["out"] + "/") + col("id").cast(daft.DataType.string()) + lit(".jpg"))
        # 8 connections: the default 32 hung at this size on the development machine
        .with_column("stored", col("jpeg").upload(col("key"), max_connections=8, io_config=io))
        .select("id", "stored")
    )
    images = len(frame.to_pydict()["id"])
    print(json.dumps({"images": images, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
