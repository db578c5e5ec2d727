"""The deployment files, checked statically (no Docker engine or cluster here)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from workers.routes import TASK_ROUTES

ROOT = Path(__file__).resolve().parent.parent
QUEUES = sorted({route["queue"] for route in TASK_ROUTES.values()})


def test_compose_file_is_valid_and_has_one_service_per_pool() -> None:
    if shutil.which("docker-compose"):
        rendered = subprocess.run(
            ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        config = yaml.safe_load(rendered)
    else:  # .ci/run installs docker-compose; without it, still check what YAML can show
        config = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = config["services"]
    assert {"postgres", "redis", "minio", "flower", "producer"} <= set(services)
    for queue in QUEUES:
        command = services[f"worker-{queue}"]["command"]
        command = command if isinstance(command, str) else " ".join(command)
        assert f"-Q {queue}" in command
    assert "--pool threads" in str(services["worker-upload"]["command"])
    assert services["worker-transform"]["environment"]["S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "producer dispatch" in str(services["dispatcher"]["command"])
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert any(
        str(volume).endswith(":/data") or "/data" in str(volume) for volume in services["redis"]["volumes"]
    )


def test_kubernetes_manifests_have_a_deployment_and_scaler_per_pool() -> None:
    documents = [
        document
        for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document and "metadata" in document
    ]
    names = {(document["kind"], document["metadata"]["name"]) for document in documents}
    for queue in QUEUES:
        assert ("Deployment", f"worker-{queue}") in names
        assert ("ScaledObject", f"worker-{queue}") in names
    assert ("Deployment", "dispatcher") in names
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: kustomize build not checked")
    subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "k8s")], capture_output=True, check=True)
