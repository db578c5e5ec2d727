"""The Kubernetes manifests as kustomize renders them: valid, and what they promise."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from common.config import Settings
from tests.deploy.render import (
    OVERLAYS,
    QUEUES,
    find,
    kustomize,
    project_version,
    scaledobject_validator,
    schema_errors,
)

KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes these manifests promise to run on
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def secret_values(overlay: str, name: str) -> dict[str, str]:
    (secret,) = find(kustomize(overlay), "Secret", name)
    return {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}


def config_values(overlay: str) -> dict[str, str]:
    (config,) = find(kustomize(overlay), "ConfigMap", "quarry-config")
    return dict(config["data"])


# each workload's Secret and what it may hold: its own login's password, the broker's, S3 keys
OWN_SECRETS = {
    "quarry-worker": {"WORKER_ROLE_PASSWORD", "REDIS_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "quarry-dispatcher": {"DISPATCHER_ROLE_PASSWORD", "REDIS_PASSWORD"},
    "quarry-flower": {"FLOWER_BASIC_AUTH", "REDIS_PASSWORD"},
    "quarry-scaler": {"SCALER_ROLE_PASSWORD", "REDIS_PASSWORD"},
}


def is_fully_qualified(host: str) -> bool:
    """Resolvable from KEDA's namespace: a dotted name (e.g. redis.quarry.svc.cluster.local)."""
    return "." in host and host != "localhost"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_builtin_resource_matches_the_kubernetes_schema(overlay: str) -> None:
    for document in kustomize(overlay):
        if document["kind"] in KEDA_KINDS:
            continue
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_scaled_object_matches_kedas_crd(overlay: str) -> None:
    scaled = find(kustomize(overlay), "ScaledObject")
    assert {s["metadata"]["name"] for s in scaled} == {f"worker-{queue}" for queue in QUEUES}
    for document in scaled:
        assert schema_errors(scaledobject_validator(), document) == [], document["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_owns_the_replicas_of_the_pools_it_scales(overlay: str) -> None:
    documents = kustomize(overlay)
    for scaled in find(documents, "ScaledObject"):
        (target,) = find(documents, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], f"{target['metadata']['name']}: KEDA sets replicas"
    assert find(documents, "Deployment", "dispatcher")[0]["spec"]["replicas"] == 2  # not KEDA's


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_pools_shut_down_warm_before_they_are_killed(overlay: str) -> None:
    documents = kustomize(overlay)
    lease = Settings().chunk_lease_s
    for queue in QUEUES:
        (deployment,) = find(documents, "Deployment", f"worker-{queue}")
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= 120, f"worker-{queue}: {grace} s"
    (transform,) = find(documents, "Deployment", "worker-transform")
    assert transform["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > lease


def test_the_example_overlay_pins_every_image_to_this_version() -> None:
    version = project_version()
    for document in kustomize("overlays/example"):
        if document["kind"] == "Deployment":
            for container in containers(document):
                assert container["image"] == f"registry.example.com/quarry:{version}", container["image"]
    for document in kustomize("base"):
        if document["kind"] == "Deployment":
            for container in containers(document):
                assert container["image"] == f"quarry:{version}"


def test_scalers_reach_redis_and_postgres_by_fully_qualified_names() -> None:
    documents = kustomize("overlays/example")
    config = config_values("overlays/example")
    broker = urlsplit(config["CELERY_BROKER_URL"])
    database = urlsplit(config["DATABASE_URL"])
    assert is_fully_qualified(database.hostname or ""), config["DATABASE_URL"]
    assert (database.username, database.password, broker.password) == (None, None, None)
    triggers = [t for s in find(documents, "ScaledObject") for t in s["spec"]["triggers"]]
    assert {t["type"] for t in triggers} == {"redis", "postgresql"}
    for trigger in triggers:
        if trigger["type"] == "redis":
            host, port = trigger["metadata"]["address"].rsplit(":", 1)
            assert is_fully_qualified(host), trigger["metadata"]["address"]
            assert (host, int(port)) == (broker.hostname, broker.port or 6379)  # the Celery broker
            assert trigger["metadata"]["listName"] in QUEUES
        else:  # KEDA logs in as the scaler role, which reads the backlog and nothing else
            metadata = trigger["metadata"]
            assert (metadata["host"], int(metadata["port"])) == (database.hostname, database.port or 5432)
            assert (
                metadata["userName"] == Settings.model_fields["scaler_role"].default
                and metadata["dbName"] == "quarry"
            )
            assert "connection" not in metadata and "connectionFromEnv" not in metadata


def test_scaler_credentials_come_from_the_secret_through_trigger_authentication() -> None:
    documents = kustomize("overlays/example")
    secrets = secret_values("overlays/example", "quarry-scaler")
    authentications = {a["metadata"]["name"]: a for a in find(documents, "TriggerAuthentication")}
    for scaled in find(documents, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            assert "password" not in trigger["metadata"]
            authentication = authentications[trigger["authenticationRef"]["name"]]
            for reference in authentication["spec"]["secretTargetRef"]:
                assert reference["name"] == "quarry-scaler" and reference["key"] in secrets
            wanted = {"redis": "password", "postgresql": "password"}[trigger["type"]]
            assert wanted in {r["parameter"] for r in authentication["spec"]["secretTargetRef"]}


def test_the_transform_pool_scales_on_the_ledger_backlog_not_on_redis() -> None:
    (transform,) = find(kustomize("base"), "ScaledObject", "worker-transform")
    (trigger,) = transform["spec"]["triggers"]
    assert trigger["type"] == "postgresql" and "job_chunks" in trigger["metadata"]["query"]


def test_an_empty_s3_endpoint_in_the_config_map_means_aws_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.storage import ObjectStore

    (config,) = find(kustomize("base"), "ConfigMap", "quarry-config")
    monkeypatch.setenv("S3_ENDPOINT_URL", config["data"]["S3_ENDPOINT_URL"])
    settings = Settings()
    assert settings.s3_endpoint_url is None
    store = ObjectStore(settings)  # boto3 raised "Invalid endpoint" for ''
    assert store.endpoint == "AWS S3"
    assert store._client.meta.endpoint_url.endswith(".amazonaws.com")


def test_the_gpu_overlay_puts_only_inference_on_a_gpu_and_requires_it() -> None:
    documents = kustomize("overlays/gpu")
    version = project_version()
    for deployment in find(documents, "Deployment"):
        (container,) = containers(deployment)
        environment = {e["name"]: e.get("value") for e in container.get("env", [])}
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if deployment["metadata"]["name"] == "worker-inference":
            assert gpus == 1 and environment["REQUIRE_GPU"] == "1"
            assert container["image"] == f"registry.example.com/quarry:{version}-gpu"
        else:
            assert gpus is None and "REQUIRE_GPU" not in environment
            assert container["image"] == f"registry.example.com/quarry:{version}"


def test_flower_is_not_exposed_outside_the_cluster_and_asks_for_a_password() -> None:
    documents = kustomize("overlays/example")
    (service,) = find(documents, "Service", "flower")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert "FLOWER_BASIC_AUTH" in secret_values("overlays/example", "quarry-flower")
    (flower,) = find(documents, "Deployment", "flower")
    assert {"secretRef": {"name": "quarry-flower"}} in containers(flower)[0]["envFrom"]


def test_no_secret_ships_and_each_workload_reads_only_its_own() -> None:
    assert find(kustomize("base"), "Secret") == []
    example = kustomize("overlays/example")
    for secret in find(example, "Secret"):
        name = secret["metadata"]["name"]
        values = secret_values("overlays/example", name)
        assert values and set(values.values()) == {""}, f"{name} ships a value"
        if name in OWN_SECRETS:
            assert set(values) == OWN_SECRETS[name], name
    wanted = {"dispatcher": "quarry-dispatcher", "flower": "quarry-flower"}
    for deployment in find(example, "Deployment"):
        name = deployment["metadata"]["name"]
        (container,) = containers(deployment)
        secrets = [source["secretRef"]["name"] for source in container["envFrom"] if "secretRef" in source]
        assert secrets == [wanted.get(name, "quarry-worker")], name


def test_network_policies_fence_postgres_redis_and_the_metrics_port() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in find(kustomize("base"), "NetworkPolicy")}
    assert policies["quarry-no-ingress"] == {
        "podSelector": {"matchLabels": {"app": "quarry"}},
        "policyTypes": ["Ingress"],
    }
    (metrics,) = policies["quarry-metrics-from-monitoring"]["ingress"]
    assert {port["port"] for port in metrics["ports"]} == {
        Settings.model_fields["dispatch_metrics_port"].default,
        5555,
    }
    for name, port in (("postgresql-from-quarry", 5432), ("redis-from-quarry", 6379)):
        (rule,) = policies[name]["ingress"]
        assert [p["port"] for p in rule["ports"]] == [port]
        assert {"podSelector": {"matchLabels": {"app": "quarry"}}} in rule["from"]
    assert config_values("base")["DISPATCH_METRICS_BIND"] == "0.0.0.0"
