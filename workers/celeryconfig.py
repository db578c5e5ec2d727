"""Celery configuration, loaded by name from `workers.celery_app`; values come from Settings."""

from common.config import get_settings, stage_time_limits
from workers.routes import TASK_ROUTES

_settings = get_settings()

broker_url = _settings.broker_url
broker_connection_retry_on_startup = True
# Redis redelivers a task that was not acked within this many seconds. The ledger re-dispatches a
# chunk once its lease runs out, so this is set above the lease (2 x by default): by the time Redis
# restores a lost message, the chunk has been sent again and the old message is dropped as stale.
# A silent Redis (a partition that drops packets, a frozen host) ends in an error, which the
# worker and the dispatcher handle by reconnecting, instead of a read that waits forever: a
# command's reply is given up on after 10 s and the command tried once more on a new connection;
# kombu drops a consumer's BRPOP connection whose reply is overdue by the health-check interval
# (kombu >= 5.7) and pings idle connections before use; TCP keepalives run underneath.
broker_transport_options = {
    "visibility_timeout": _settings.visibility_timeout_s,
    "socket_timeout": 10,
    "socket_connect_timeout": 10,
    "socket_keepalive": True,
    "retry_on_timeout": True,
    "health_check_interval": 10,
}

# Time limits per task, from the lease (common.config.stage_time_limits): the prefork pools
# (transform, inference) enforce them; Celery's threads pool (upload) cannot, and relies on the
# socket timeouts above and PostgreSQL's keepalives (common/db.py) for silent peers.
task_soft_time_limit, task_time_limit = stage_time_limits(_settings)

task_routes = TASK_ROUTES
task_serializer = "json"  # kombu's JSON carries bytes as base64
accept_content = ["json"]
task_ignore_result = True  # progress lives in PostgreSQL, not in a result backend
result_backend = None

# Ack after the task ran (a warm shutdown hands unstarted tasks back). A worker killed mid-task
# loses its message: the chunk ledger dispatches the chunk again when its lease runs out.
# Every task is idempotent (deterministic keys, upserts, ledger bitmaps), so a rerun is harmless.
task_acks_late = True
task_reject_on_worker_lost = False
worker_prefetch_multiplier = 1
# A worker takes a message only when one of its processes is free: every message delivered and not
# acked is then being worked on, and held in the ledger (common/liveness.py), so a process lost
# with messages reserved behind its task cannot leave them parked until the visibility timeout.
worker_disable_prefetch = True

worker_send_task_events = True  # for Flower
task_send_sent_event = True
broker_connection_max_retries = None  # a worker waits out a broker restart instead of exiting
