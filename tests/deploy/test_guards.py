"""The guards the deployment relies on, against real processes: REQUIRE_GPU and Flower's login."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

from tests.stack import BIN, Stack, free_port, wait_until


def test_require_gpu_stops_an_inference_worker_that_would_run_on_cpu(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    """This machine's onnxruntime has no CUDA provider: the inference pool must refuse to start,
    in one line and with a non-zero exit, while the other pools ignore the setting."""
    stack = Stack({**test_env, "REQUIRE_GPU": "1"}, tmp_path)
    try:
        stack.start_pool("inference", wait=False)
        stack.start_pool("transform")  # waits for " ready."
        inference = stack.processes["worker-inference"]
        assert inference.wait(timeout=60) == 1
        log = (tmp_path / "worker-inference.log").read_text()
        refusal = [line for line in log.splitlines() if line.startswith("refusing to start")]
        assert len(refusal) == 1 and "has no CUDAExecutionProvider" in refusal[0], log[-2000:]
        assert " ready." not in log
        assert stack.processes["worker-transform"].poll() is None
    finally:
        stack.stop_all()


def get(url: str, login: str | None = None) -> int:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_flower_with_basic_auth_asks_for_the_password(test_env: dict[str, str], tmp_path: Path) -> None:
    """FLOWER_BASIC_AUTH (as compose and the k8s Secret set it) locks the dashboard and its API;
    /healthcheck and /metrics stay open for probes and Prometheus."""
    port = free_port()
    stack = Stack({**test_env, "FLOWER_BASIC_AUTH": "admin:s3cret"}, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        stack.start(
            "flower",
            [str(BIN / "celery"), "-A", "workers", "flower", "--address=127.0.0.1", f"--port={port}"],
        )
        wait_until(lambda: get(f"{base}/healthcheck") == 200, 60, "Flower")
        assert get(f"{base}/") == 401
        assert get(f"{base}/api/workers") == 401
        assert get(f"{base}/", "admin:wrong") == 401
        assert get(f"{base}/", "admin:s3cret") == 200
        assert get(f"{base}/metrics") == 200
    finally:
        stack.stop_all()
