"""The one Celery app. Start a pool with `celery -A workers worker -Q transform|upload|inference`."""

from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup

from common.memory import return_large_buffers
from common.shards import parquet_bytes
from workers.routes import INFERENCE, TRANSFORM, queue_of

return_large_buffers()  # before any pool allocates an image; forked children inherit it (common/memory.py)
app = Celery("quarry", include=["workers.transform", "workers.upload", "workers.inference", "workers.ingest"])
app.config_from_object("workers.celeryconfig")
MANIFEST_QUEUES = {queue_of(TRANSFORM), queue_of(INFERENCE)}  # the pools that write parquet manifests


@celeryd_after_setup.connect
def warm_arrow(sender: str, instance: Any, **_: Any) -> None:
    """Arrow's first parquet write initialises the library (0.36 s measured). The pools that write
    shard manifests (transform, inference) do it once here, in the main process before it forks
    its children: a child's first manifest then takes 2 ms, and the children share those pages.
    The upload pool never writes one and skips it."""
    if MANIFEST_QUEUES & set(instance.app.amqp.queues.consume_from):
        parquet_bytes([])
