"""Quarry's Celery worker pools: one task module per stage."""

from workers.celery_app import app

__all__ = ["app"]
