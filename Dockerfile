# One image for every Python service: producer, dispatcher, the three pools, Flower.
#   make image                 -> quarry:VERSION      (onnxruntime, CPU)
#   make image RUNTIME=gpu     -> quarry:VERSION-gpu  (onnxruntime-gpu with its CUDA 13 and cuDNN
#                                 wheels; the host needs only the NVIDIA driver and container toolkit)
#   EXTRAS=notebook            -> the same with JupyterLab (Compose's `notebook` service, `make build`)
# The GPU image never holds the CPU onnxruntime too: the two packages overwrite each other.
FROM python:3.11.11-slim-bookworm
ARG RUNTIME=cpu
ARG EXTRAS=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATASET_PATH=/app/data/sample MODEL_CACHE_DIR=/tmp/quarry-models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY quarry ./quarry
COPY workers ./workers
COPY examples ./examples
COPY models ./models
COPY data ./data
RUN pip install ".[${RUNTIME}${EXTRAS:+,${EXTRAS}}]" \
 && if [ "$RUNTIME" = gpu ] && pip show onnxruntime >/dev/null 2>&1; then \
      echo "onnxruntime (CPU) installed beside onnxruntime-gpu" >&2; exit 1; fi
USER nobody
