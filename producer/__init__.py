"""The producer: ingest a dataset, select images with SQL, enqueue them in chunks, follow jobs."""
