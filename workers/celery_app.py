"""The one Celery app. Start a pool with `celery -A workers worker -Q transform|upload|inference`."""

from celery import Celery
from celery.signals import worker_init

from common.shards import parquet_bytes

app = Celery("quarry", include=["workers.transform", "workers.upload", "workers.inference", "workers.ingest"])
app.config_from_object("workers.celeryconfig")


@worker_init.connect
def warm_arrow(**_: object) -> None:
    """Arrow's first parquet write initialises the library (0.36 s measured); done once here, in
    the pool's main process before it forks its children, a child's first shard manifest takes
    2 ms instead, and the children share those pages."""
    parquet_bytes([])
