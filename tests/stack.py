"""Real processes for the end-to-end and fault tests: worker pools, dispatchers and, where a test
must kill the broker, a private redis-server. Each process logs to its own file in `log_dir`."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from common.jobs import JobProgress, job_progress
from common.storage import ObjectStore
from producer import s3_gateway
from workers.routes import TASK_ROUTES

BIN = Path(sys.executable).parent
POOLS = {"transform": ("prefork", 2), "upload": ("threads", 8), "inference": ("prefork", 1)}


HEAL_TIMEOUT_S = 240  # a deadline for the wait only: healing takes seconds (bench.faults)
SENT_AGAIN = "chunks of lost workers or lost messages sent again"  # the dispatcher's line

# one line of the S3 request log (tests/s3_proxy.py): `"GET /bucket/key HTTP/1.1"`
REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) ([^ ]*)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # the service is still starting
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen in {timeout} s")


class RequestLog:
    """The requests the S3 server was sent (its proxy's log at `path`) since the last `mark()`."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of each request since the mark, in order."""
        with self.path.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        return REQUEST.findall(text)

    def since_mark(self) -> dict[str, int]:
        """Requests since the mark, counted by method."""
        counts: dict[str, int] = {}
        for method, _ in self.requests():
            counts[method] = counts.get(method, 0) + 1
        return counts


@dataclass
class S3Server:
    """A real S3 server on loopback (the JuiceFS gateway: MinIO's S3 API over a local volume)
    behind a counting proxy (tests/s3_proxy.py). `process` is the server itself, for a test that
    freezes it; `endpoint` is the proxy's; `log` holds one line per request."""

    process: subprocess.Popen[bytes]
    proxy: subprocess.Popen[bytes]
    endpoint: str
    log: Path
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """The settings that reach it."""
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def requests(self) -> RequestLog:
        return RequestLog(self.log)

    def describe(self) -> str:
        """What a benchmark's header names as its S3 server."""
        version = subprocess.run(
            [s3_gateway.juicefs_binary(), "version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return f"{version or 'juicefs'} gateway on local disk, behind a counting proxy"

    def stop(self) -> None:
        for process in (self.proxy, self.process):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a test may have left it frozen
                process.terminate()
        for process in (self.proxy, self.process):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_s3(root: Path) -> S3Server:
    """The JuiceFS gateway with keys of its own on a volume under `root`, behind a counting proxy
    on another free port; returned once the proxy answers."""
    access_key, secret_key = "quarry-tests", uuid.uuid4().hex
    process, upstream = s3_gateway.start(root / "juicefs", free_port(), access_key, secret_key)
    log, port = root / "requests.log", free_port()
    log.touch()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.s3_proxy", str(port), upstream.rsplit(":", 1)[1], str(log)],
        cwd=Path(__file__).resolve().parent.parent,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: s3_gateway.answers(endpoint), 20, "the S3 proxy")
    except TimeoutError:
        proxy.kill()
        process.kill()
        raise
    log.write_bytes(b"")  # the readiness probes are not the tests' requests
    return S3Server(process, proxy, endpoint, log, access_key, secret_key)


class Stack:
    """Named processes started in their own process groups, so a test can kill a whole pool."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.redis_port: int | None = None
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        """Start `command` with this stack's environment, and `env` on top of it."""
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                command,
                env={**os.environ, **self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def send_signal(self, name: str, sig: signal.Signals) -> None:
        """Send a signal to a process and every child of it."""
        os.killpg(self.processes[name].pid, sig)

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    def terminate(self, name: str, timeout: float = 300) -> None:
        """SIGTERM the process alone, as `docker stop` and a Kubernetes scale-down do (the signal
        goes to the container's first process, not to its children), and wait for it to exit."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout)

    def kill_pool_mid_chunk(self, queue: str, timeout: float = 60) -> list[dict[str, object]]:
        """SIGKILL a pool at a moment it holds a task whose chunk the ledger has not finished.

        The pool is frozen (SIGSTOP) before looking, so it can neither record nor take a task
        between the look and the kill. A taken task whose chunk is finished is not enough: the
        worker acks after it records, so such a task is already safe. An idle pool is thawed and
        looked at again. The tickets of the unfinished chunks it held."""
        name = f"worker-{queue}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send_signal(name, signal.SIGSTOP)
            try:
                held = [t for t in self.held_tickets(queue) if self.chunk_state(t) == "dispatched"]
                if held:
                    self.stop(name, signal.SIGKILL)
                    return held
            finally:
                if name in self.processes:  # not killed: thaw it, also when the look failed
                    self.send_signal(name, signal.SIGCONT)
            time.sleep(0.05)
        raise TimeoutError(f"the {queue} pool held no unfinished chunk in {timeout} s")

    def held_tickets(self, queue: str) -> list[dict[str, object]]:
        """The chunk tickets of `queue`'s messages that a worker took and has not acked.

        kombu keeps each in its `unacked` hash as [message, exchange, routing key]; the message
        body is Celery's base64 JSON [args, kwargs, embed], and the ticket is the dict argument
        that names a chunk."""
        tickets = []
        for entry in self.redis().hvals("unacked"):
            message, _exchange, routing_key = json.loads(entry)
            if routing_key == queue:
                args = json.loads(base64.b64decode(message["body"]))[0]
                tickets += [arg for arg in args if isinstance(arg, dict) and "chunk" in arg]
        return tickets

    def chunk_state(self, ticket: dict[str, object]) -> str:
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            row = conn.execute(
                "SELECT state FROM job_chunks WHERE job_id = %s AND chunk_index = %s",
                (ticket["job_id"], ticket["chunk"]),
            ).fetchone()
        assert row is not None, f"no chunk for {ticket}"
        return str(row[0])

    def wait_exit(self, name: str, timeout: float) -> int:
        """The exit code of a process that is expected to end by itself (still running after
        `timeout`: TimeoutExpired, and stop_all ends it)."""
        code = self.processes[name].wait(timeout)
        del self.processes[name]
        return code

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    # --- a private broker ---------------------------------------------------------------
    def start_redis(self, db: int = 0) -> None:
        """A redis-server of this stack's own (no persistence), which the test may kill."""
        self.redis_port = self.redis_port or free_port()
        self.start(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.log_dir),
            ],
        )
        self.env["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{self.redis_port}/{db}"
        wait_until(self.redis().ping, 10, "redis-server")

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["CELERY_BROKER_URL"], socket_timeout=2)

    def drained(self) -> bool:
        """Whether no stage message waits in a queue and none is taken and not yet acked (a
        worker acks after it records)."""
        client = self.redis()
        queues = {route["queue"] for route in TASK_ROUTES.values()}
        return client.hlen("unacked") == 0 and all(client.llen(queue) == 0 for queue in queues)

    def last_tick(self) -> object:
        """When a dispatcher last said it was alive (each tick does)."""
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            row = conn.execute("SELECT max(seen_at) FROM dispatchers").fetchone()
        return None if row is None else row[0]

    def wait_ticked(self, timeout: float = 60) -> None:
        """Wait for the dispatcher's next tick."""
        before = self.last_tick()
        wait_until(lambda: self.last_tick() != before, timeout, "a dispatcher tick")

    # --- Quarry's processes -------------------------------------------------------------
    def start_pool(
        self,
        queue: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        *,
        pool: str | None = None,
        concurrency: int | None = None,
    ) -> None:
        """Start a pool (the tests' POOLS, unless `pool` and `concurrency` say otherwise)."""
        pool, concurrency = pool or POOLS[queue][0], concurrency or POOLS[queue][1]
        log = self.log_dir / f"worker-{queue}.log"
        ready_before = log.read_text().count(" ready.") if log.exists() else 0
        self.start(
            f"worker-{queue}",
            [
                str(BIN / "celery"),
                "-A",
                "workers",
                "worker",
                "-Q",
                queue,
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "-n",
                f"{queue}.{self.log_dir.name}@%h",
                "--loglevel",
                "INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            env,
        )
        if wait:
            wait_until(lambda: log.read_text().count(" ready.") > ready_before, 60, f"the {queue} pool")

    def restart_exited_pools(self) -> list[str]:
        """Start again each pool whose process ended by itself, as a supervisor would (Compose's
        `restart: unless-stopped`, a Kubernetes Deployment); the queues restarted. A Celery worker
        can end on a lost broker: kombu 5.7 sometimes fails to close a channel whose transport is
        already gone ("Unrecoverable error: AttributeError ... 'hostname'") and the worker exits."""
        restarted = []
        for name in [name for name, process in self.processes.items() if name.startswith("worker-")]:
            if self.processes[name].poll() is not None:
                del self.processes[name]
                self.start_pool(name.removeprefix("worker-"))
                restarted.append(name)
        return restarted

    def start_pools(self) -> None:
        for queue in POOLS:
            self.start_pool(queue, wait=False)
        for queue in POOLS:
            log = self.log_dir / f"worker-{queue}.log"
            wait_until(lambda log=log: " ready." in log.read_text(), 60, f"the {queue} pool")

    def start_own(self) -> None:
        """A broker of this stack's own, the three pools and a dispatcher."""
        self.start_redis()
        self.start_pools()
        self.start_dispatcher()

    def start_dispatcher(self, name: str = "dispatcher", env: dict[str, str] | None = None) -> None:
        self.start(name, [str(BIN / "producer"), "dispatch"], env)

    # --- jobs ---------------------------------------------------------------------------
    def submit(self, query: str, *args: str) -> str:
        """`producer run` as a user types it; the job id."""
        out = subprocess.run(
            [str(BIN / "producer"), "run", "--query", query, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        return out.stdout.strip().splitlines()[-1]

    def progress(self, job_id: str) -> JobProgress:
        """The job's counts on a fresh connection (the fault tests terminate connections)."""
        for _ in range(50):
            try:
                with psycopg.connect(self.env["DATABASE_URL"], autocommit=True) as conn:
                    found = job_progress(conn, job_id)
                    assert found is not None
                    return found
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise AssertionError("PostgreSQL did not answer")

    def wait_ended(self, job_id: str, timeout: float = 240) -> JobProgress:
        """The job's counts once it ended; AssertionError with every log past `timeout`."""
        try:
            wait_until(lambda: self.progress(job_id).ended, timeout, f"job {job_id} to end", interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; {self.progress(job_id)}\n{self.logs()}") from exc
        return self.progress(job_id)

    def assert_finished_cleanly(
        self, job_id: str, total: int, store: ObjectStore | None = None, bucket: str = ""
    ) -> None:
        """Once the job ended: finished, every one of `total` items done once and none failed, one
        done row per item, and (with `store`) one object per item under the job in `bucket`."""
        final = self.wait_ended(job_id)
        assert (final.state, final.failed, final.done, final.total) == ("finished", 0, total, total), (
            self.logs()
        )
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            rows = conn.execute(
                "SELECT count(*), count(DISTINCT (image_id, variant)) FROM job_items"
                " WHERE job_id = %s AND status = 'done'",
                (job_id,),
            ).fetchone()
        assert rows == (total, total)
        if store is not None:
            assert len(store.list_keys(bucket, f"{job_id}/")) == total

    def chunk_dispatches(self) -> dict[tuple[str, int], tuple[str, int]]:
        """(job, chunk) -> (state, dispatches) of every chunk."""
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            rows = conn.execute("SELECT job_id::text, chunk_index, state, dispatches FROM job_chunks")
            return {(job, chunk): (state, count) for job, chunk, state, count in rows}

    def wait_sent_again(self, lost: dict[tuple[str, int], int]) -> None:
        """Wait until every chunk of `lost` (key -> its dispatches at the loss) was dispatched
        again or finished, restarting a pool that ended by itself as its supervisor would; then
        at least one was sent again, and the dispatcher says its liveness check did it. A lost
        chunk can finish without being sent again: its holder may have handed the chunk's message
        on to the next stage (another process's) just before it was lost, and still held it, and
        a message a pool had taken ahead, in its own memory, can outlive a broker."""
        assert lost, "the precondition failed: no chunk was lost"

        def healed() -> bool:
            self.restart_exited_pools()
            now = self.chunk_dispatches()
            return all(now[key][0] == "finished" or now[key][1] > count for key, count in lost.items())

        wait_until(healed, HEAL_TIMEOUT_S, f"chunks {sorted(lost)} to be sent again", interval=0.2)
        now = self.chunk_dispatches()
        assert any(now[key][1] > count for key, count in lost.items()), "no lost chunk was sent again"
        assert SENT_AGAIN in self.log("dispatcher"), self.logs()

    def redispatched(self, job_id: str) -> int:
        """Dispatches beyond the first, over the job's chunks."""
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            row = conn.execute("SELECT sum(dispatches - 1) FROM job_chunks WHERE job_id = %s", (job_id,))
            return int(row.fetchone()[0])  # type: ignore[index]

    def logs(self) -> str:
        """Every log's last lines, for a failing test's message."""
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
            for path in sorted(self.log_dir.glob("*.log"))
        )
