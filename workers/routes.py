"""Task names and the queue each one runs on: the only place that maps stages to queues."""

TRANSFORM = "quarry.transform"
UPLOAD = "quarry.upload"
INFERENCE = "quarry.inference"
INFERENCE_SHARD = "quarry.inference.shard"  # webdataset output: classify a staged shard
INGEST = "quarry.ingest"  # register one unit of a dataset (runs on the transform pool)

TASK_ROUTES = {
    TRANSFORM: {"queue": "transform"},
    UPLOAD: {"queue": "upload"},
    INFERENCE: {"queue": "inference"},
    INFERENCE_SHARD: {"queue": "inference"},
    INGEST: {"queue": "transform"},
}


def queue_of(task_name: str) -> str:
    """The queue a task is routed to."""
    return TASK_ROUTES[task_name]["queue"]
