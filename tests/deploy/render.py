"""Render the deployment files as the tools would (no Docker engine or cluster needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from workers.routes import TASK_ROUTES

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "schemas"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("base", "overlays/example", "overlays/gpu")
QUEUES = sorted({route["queue"] for route in TASK_ROUTES.values()})
# every secret docker-compose.yml demands, each a value found nowhere else in the files
COMPOSE_SECRETS = {
    "POSTGRES_PASSWORD": "secret-postgres-1",
    "QUARRY_DB_PASSWORD": "secret-owner-2",
    "QUERY_ROLE_PASSWORD": "secret-reader-3",
    "WORKER_ROLE_PASSWORD": "secret-worker-4",
    "DISPATCHER_ROLE_PASSWORD": "secret-dispatcher-5",
    "REDIS_PASSWORD": "secret-redis-6",
    "AWS_ACCESS_KEY_ID": "secret-key-id-7",
    "AWS_SECRET_ACCESS_KEY": "secret-key-8",
}
COMPOSE_ENV = {**COMPOSE_SECRETS, "FLOWER_BASIC_AUTH": "admin:test-password", "NOTEBOOK_TOKEN": "test-token"}
# what a test process's environment must not lend the Compose file (the tests' own settings)
NOT_INHERITED = (
    "FLOWER_",
    "QUARRY_",
    "POSTGRES_",
    "NOTEBOOK_",
    "AWS_",
    "REDIS_",
    "QUERY_ROLE",
    "WORKER_ROLE",
)
EMPTY_ENV_FILE = SCHEMAS / "empty.env"


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "no version in pyproject.toml"
    return match.group(1)


def docker_compose(*files: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f FILE... config`: Compose's own parsing, interpolation and merging."""
    assert shutil.which("docker-compose"), "docker-compose is not installed (.ci/run installs it)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith((*NOT_INHERITED, "DISPATCHER_ROLE"))}
    arguments = [item for name in files for item in ("-f", str(ROOT / name))]
    return subprocess.run(
        # an empty --env-file: a developer's .env (written by `make up`) does not leak into tests
        [
            "docker-compose",
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(EMPTY_ENV_FILE),
            *arguments,
            "config",
        ],
        env={**clean, **(env if env is not None else COMPOSE_ENV)},
        capture_output=True,
        text=True,
        check=False,
    )


def compose_config(*files: str) -> dict[str, Any]:
    result = docker_compose(*files)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@cache
def kustomize(overlay: str) -> tuple[dict[str, Any], ...]:
    """The manifests `kubectl kustomize` renders for one overlay (or the base)."""
    assert shutil.which("kubectl"), "kubectl is not installed: it renders the kustomize overlays"
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return tuple(document for document in yaml.safe_load_all(rendered) if document)


def find(documents: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


@cache
def compose_schema_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))


@cache
def scaledobject_validator() -> jsonschema.Draft7Validator:
    """KEDA's ScaledObject CRD schema (OpenAPI v3, a JSON Schema subset) for keda.sh/v1alpha1."""
    crd = yaml.safe_load((SCHEMAS / "keda.sh_scaledobjects.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def schema_errors(validator: jsonschema.Draft7Validator, document: Any) -> list[str]:
    """Every violation, one line each: where, and what."""
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]
