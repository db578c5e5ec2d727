"""docker-compose.yml and its GPU override: valid against the Compose spec, and what they promise."""

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from common.roles import GUARDED_BUILTINS
from tests.deploy.render import (
    COMPOSE_ENV,
    COMPOSE_SECRETS,
    QUEUES,
    ROOT,
    compose_config,
    compose_schema_validator,
    docker_compose,
    project_version,
    schema_errors,
)
from tests.postgres import pg_port, pg_url

GPU = ("docker-compose.yml", "docker-compose.gpu.yml")
INITDB = ROOT / "deploy" / "compose" / "initdb"


def command_of(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_each_compose_file_matches_the_compose_spec(name: str) -> None:
    assert schema_errors(compose_schema_validator(), yaml.safe_load((ROOT / name).read_text())) == []


@pytest.mark.parametrize("files", [("docker-compose.yml",), GPU], ids=["cpu", "gpu"])
def test_the_rendered_stack_matches_the_compose_spec(files: tuple[str, ...]) -> None:
    assert schema_errors(compose_schema_validator(), compose_config(*files)) == []


def test_one_service_per_pool_plus_dispatcher_flower_and_the_cli() -> None:
    services = compose_config("docker-compose.yml")["services"]
    assert {"postgres", "redis", "s3", "dispatcher", "flower", "producer"} <= set(services)
    for queue in QUEUES:
        assert f"-Q {queue}" in command_of(services[f"worker-{queue}"])
        assert "replicas" not in services[f"worker-{queue}"].get("deploy", {})  # --scale owns it
    assert "--pool threads" in command_of(services["worker-upload"])
    assert command_of(services["dispatcher"]) == "producer dispatch"
    assert services["dispatcher"]["restart"] == "unless-stopped"  # its watchdog exits to be restarted
    assert services["worker-transform"]["environment"]["S3_ENDPOINT_URL"] == "http://s3:8333"


def test_every_image_is_pinned_and_quarry_is_this_version() -> None:
    services = compose_config(*GPU)["services"]
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: image {image!r} is not pinned"
        assert "minio" not in image, f"{name}: MinIO's community image is no longer maintained"
    version = project_version()
    assert services["dispatcher"]["image"] == f"quarry:{version}"
    assert services["worker-inference"]["image"] == f"quarry:{version}-gpu"


def test_redis_keeps_its_queues_in_an_append_only_file_on_a_named_volume() -> None:
    config = compose_config("docker-compose.yml")
    redis = config["services"]["redis"]
    assert "--appendonly yes" in command_of(redis)
    (volume,) = redis["volumes"]  # docker-compose 1.29 renders the short form, source:target:mode
    source, target = volume.split(":")[:2]
    assert target == "/data" and source in config["volumes"]


def test_flower_asks_for_a_password_and_listens_on_loopback() -> None:
    flower = compose_config("docker-compose.yml")["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "admin:test-password"
    for port in flower["ports"]:  # short form, host_ip:published:target/protocol
        assert port.startswith("127.0.0.1:"), port


def test_flower_without_a_password_is_refused_in_one_line() -> None:
    result = docker_compose("docker-compose.yml", env={**COMPOSE_SECRETS, "NOTEBOOK_TOKEN": "test-token"})
    assert result.returncode != 0
    assert "set FLOWER_BASIC_AUTH=user:password" in result.stderr


def test_the_notebook_runs_jupyterlab_on_the_examples_with_the_stacks_settings_and_a_token() -> None:
    services = compose_config("docker-compose.yml")["services"]
    notebook = services["notebook"]
    assert notebook["image"] == f"quarry-notebook:{project_version()}"
    assert notebook["build"]["args"] == {"EXTRAS": "notebook"}
    assert command_of(notebook).startswith("jupyter lab --ip=0.0.0.0 --port=8888")
    assert "--ServerApp.root_dir=/app/examples" in command_of(notebook)
    assert notebook["environment"]["JUPYTER_TOKEN"] == "test-token"
    settings = {k: v for k, v in notebook["environment"].items() if k not in ("JUPYTER_TOKEN", "HOME")}
    assert settings == services["producer"]["environment"]  # the same stack, as the CLI: the owner
    assert all(port.startswith("127.0.0.1:") for port in notebook["ports"])
    refused = docker_compose("docker-compose.yml", env={**COMPOSE_SECRETS, "FLOWER_BASIC_AUTH": "admin:x"})
    assert refused.returncode != 0 and "set NOTEBOOK_TOKEN" in refused.stderr


def test_s3_is_published_on_loopback_only() -> None:
    for port in compose_config("docker-compose.yml")["services"]["s3"]["ports"]:
        assert port.startswith("127.0.0.1:"), port


def test_services_others_wait_for_have_healthchecks() -> None:
    services = compose_config("docker-compose.yml")["services"]
    for name in ("postgres", "redis", "s3", "flower", *(f"worker-{queue}" for queue in QUEUES)):
        assert services[name]["healthcheck"]["test"], name
    for queue in QUEUES:  # a warm shutdown has time to finish the running tasks
        assert services[f"worker-{queue}"]["stop_grace_period"] in ("2m", "120s")


def test_the_gpu_override_reserves_a_gpu_and_refuses_to_run_on_cpu() -> None:
    services = compose_config(*GPU)["services"]
    inference = services["worker-inference"]
    (device,) = inference["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert inference["environment"]["REQUIRE_GPU"] == "1"
    assert inference["build"]["args"]["RUNTIME"] == "gpu"
    assert "REQUIRE_GPU" not in services["worker-transform"]["environment"]


@pytest.fixture
def initdb_names(postgres_server: str) -> Iterator[str]:
    """A role and database name for one run of the Compose init script, dropped after."""
    name = f"quarry_initdb_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"DROP ROLE IF EXISTS {name}")


def test_the_compose_database_is_owned_by_a_role_that_is_not_a_superuser(initdb_names: str) -> None:
    """deploy/compose/initdb, run as the postgres image runs it (its superuser, on a new volume;
    here with the names made unique): the owner is no superuser, owns the database, and is the
    only role besides superusers that may run the guarded built-ins there; pgvector is installed."""
    script = (INITDB / "10-quarry.sh").read_text()
    script = re.sub(r"\bquarry\b", initdb_names, script)
    result = subprocess.run(
        ["bash", "-c", script],
        env={
            **os.environ,
            "POSTGRES_USER": "postgres",
            "QUARRY_DB_PASSWORD": "initdb-test",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(pg_port()),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    with psycopg.connect(pg_url(initdb_names), autocommit=True) as conn:
        role = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcanlogin FROM pg_roles WHERE rolname = %s", (initdb_names,)
        ).fetchone()
        assert role == (False, True, True)
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        )
        assert owner.fetchone() == (initdb_names,)
        assert conn.execute("SELECT extname FROM pg_extension WHERE extname = 'vector'").fetchone() == (
            "vector",
        )
        guarded = conn.execute(
            "SELECT p.oid::regprocedure::text, has_function_privilege('public', p.oid, 'EXECUTE'),"
            " has_function_privilege(%s, p.oid, 'EXECUTE') FROM pg_proc p"
            " WHERE p.pronamespace = 'pg_catalog'::regnamespace"
            " AND (p.proname = ANY(%s) OR p.proname LIKE 'pg\\_%%advisory\\_%%')",
            (initdb_names, list(GUARDED_BUILTINS)),
        ).fetchall()
    assert len(guarded) >= len(GUARDED_BUILTINS) + 10
    assert [row for row in guarded if row[1:] != (False, True)] == []


def test_without_its_secrets_the_stack_is_refused_naming_the_one_missing() -> None:
    nothing = docker_compose("docker-compose.yml", env={})
    assert nothing.returncode != 0 and "set POSTGRES_PASSWORD (make up writes one to .env)" in nothing.stderr
    for name in COMPOSE_SECRETS:
        missing = docker_compose(
            "docker-compose.yml", env={k: v for k, v in COMPOSE_ENV.items() if k != name}
        )
        assert missing.returncode != 0 and f"set {name} " in missing.stderr, (name, missing.stderr)


def test_no_default_secret_is_rendered_and_each_process_holds_only_its_own() -> None:
    rendered = docker_compose("docker-compose.yml").stdout
    for default in ("quarry-dev-secret", "quarry-reader", "quarry:quarry@", "change-me"):
        assert default not in rendered, default
    services = compose_config("docker-compose.yml")["services"]
    owner_url = f"postgresql://quarry:{COMPOSE_SECRETS['QUARRY_DB_PASSWORD']}@postgres:5432/quarry"
    broker = f"redis://default:{COMPOSE_SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    for name in ("producer", "init", "notebook"):
        assert services[name]["environment"]["DATABASE_URL"] == owner_url, name
    secrets = set(COMPOSE_SECRETS.values()) - {COMPOSE_SECRETS["REDIS_PASSWORD"]}  # in every broker URL
    held = {
        name: {v for v in service.get("environment", {}).values() if any(s in str(v) for s in secrets)}
        for name, service in services.items()
    }
    own = ("WORKER_ROLE_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    worker_secrets = {COMPOSE_SECRETS[k] for k in own}
    for queue in QUEUES:
        environment = services[f"worker-{queue}"]["environment"]
        assert held[f"worker-{queue}"] == worker_secrets, queue  # no owner's, reader's or dispatcher's
        assert environment["DATABASE_URL"] == "postgresql://postgres:5432/quarry"
        assert environment["CELERY_BROKER_URL"] == broker
    dispatcher = services["dispatcher"]["environment"]
    assert "WORKER_ROLE_PASSWORD" not in dispatcher and "QUARRY_DB_PASSWORD" not in str(dispatcher)
    assert dispatcher["DISPATCHER_ROLE_PASSWORD"] == COMPOSE_SECRETS["DISPATCHER_ROLE_PASSWORD"]
    assert "DATABASE_URL" not in services["flower"]["environment"]
    postgres = services["postgres"]["environment"]
    assert (
        "POSTGRES_USER" not in postgres and "POSTGRES_DB" not in postgres
    )  # the image's superuser stays its own


def test_redis_requires_its_password() -> None:
    redis = compose_config("docker-compose.yml")["services"]["redis"]
    assert f"--requirepass {COMPOSE_SECRETS['REDIS_PASSWORD']}" in command_of(redis)
    assert redis["environment"]["REDISCLI_AUTH"] == COMPOSE_SECRETS["REDIS_PASSWORD"]  # its healthcheck's


def test_make_ups_secrets_file_renders_the_stack_and_only_its_owner_reads_it(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    for _ in range(2):  # a second run keeps what the first generated
        subprocess.run([str(ROOT / "deploy" / "compose" / "secrets.sh"), str(env_file)], check=True)
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert set(COMPOSE_ENV) <= set(values) and len(values) == len(COMPOSE_ENV)
    assert len({v for k, v in values.items() if k != "AWS_ACCESS_KEY_ID"}) == len(values) - 1  # all differ
    assert env_file.stat().st_mode & 0o777 == 0o600
    rendered = docker_compose("docker-compose.yml", env=values)
    assert rendered.returncode == 0, rendered.stderr
    assert values["REDIS_PASSWORD"] in rendered.stdout
