"""The one Celery app. Start a pool with `celery -A workers worker -Q transform|upload|inference`."""

from celery import Celery

app = Celery("quarry", include=["workers.transform", "workers.upload", "workers.inference", "workers.ingest"])
app.config_from_object("workers.celeryconfig")
