#!/usr/bin/env bash
# GPU check for the inference stage: on a machine with one NVIDIA GPU, from a clean checkout,
# in under 5 minutes. Installs onnxruntime-gpu (never beside onnxruntime) in its own venv, then
# runs bench/inference.py with the CUDA provider and with the CPU provider and prints both.
# Offline: WHEELS=/path/to/wheels bash bench/gpu_check.sh  (pip install --no-index from there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/quarry-gpu-venv}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

pip_args=(-q)
[ -n "${WHEELS:-}" ] && pip_args+=(--no-index --find-links "$WHEELS")
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install "${pip_args[@]}" "onnxruntime-gpu[cuda,cudnn]>=1.21,<2" numpy opencv-python-headless \
  "pydantic-settings>=2.2,<3" "click>=8.1,<9" "pyyaml>=6,<7"
if "$VENV/bin/pip" show onnxruntime >/dev/null 2>&1; then
  echo "onnxruntime (CPU) is installed beside onnxruntime-gpu: they overwrite each other" >&2; exit 1
fi
export PYTHONPATH=$PWD
"$VENV/bin/python" -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())"
echo "== REQUIRE_GPU guard (what an inference worker with REQUIRE_GPU=1 checks at start)"
"$VENV/bin/python" -c "from common.model import require_cuda; print('model runs on', require_cuda('models/fashion-classifier.onnx').provider)"
echo "== CUDAExecutionProvider"
"$VENV/bin/python" -m bench.inference --provider CUDAExecutionProvider
echo "== CPUExecutionProvider"
"$VENV/bin/python" -m bench.inference --provider CPUExecutionProvider
