"""docker-compose.yml and its GPU override: valid against the Compose spec, and what they promise."""

from typing import Any

import pytest
import yaml

from tests.deploy.render import (
    QUEUES,
    ROOT,
    compose_config,
    compose_schema_validator,
    docker_compose,
    project_version,
    schema_errors,
)

GPU = ("docker-compose.yml", "docker-compose.gpu.yml")


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
    result = docker_compose("docker-compose.yml", env={"NOTEBOOK_TOKEN": "test-token"})
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
    assert settings == services["dispatcher"]["environment"]  # the same stack, the same network
    assert all(port.startswith("127.0.0.1:") for port in notebook["ports"])
    refused = docker_compose("docker-compose.yml", env={"FLOWER_BASIC_AUTH": "admin:x"})
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
