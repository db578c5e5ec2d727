"""Celery configuration, loaded by name from `workers.celery_app`; values come from Settings."""

from common.config import get_settings
from workers.routes import TASK_ROUTES

_settings = get_settings()

broker_url = _settings.celery_broker_url
broker_connection_retry_on_startup = True
# Redis redelivers a task that was not acked within this many seconds (worker lost).
broker_transport_options = {"visibility_timeout": _settings.broker_visibility_timeout_s}

task_routes = TASK_ROUTES
task_serializer = "json"  # kombu's JSON carries bytes as base64
accept_content = ["json"]
task_ignore_result = True  # progress lives in PostgreSQL, not in a result backend
result_backend = None

# At-least-once delivery: ack after the task ran, requeue if its worker dies mid-task.
# Every task is idempotent (deterministic keys, upserts), so a redelivery is harmless.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

worker_send_task_events = True  # for Flower
task_send_sent_event = True
