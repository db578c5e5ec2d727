# One image for every Python service: producer, the three pools, Flower.
# Build the GPU variant with: docker build --build-arg RUNTIME=gpu .
FROM python:3.11-slim
ARG RUNTIME=cpu
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY workers ./workers
COPY models ./models
COPY data ./data
RUN pip install --no-cache-dir ".[${RUNTIME}]"
ENV DATASET_PATH=/app/data/sample
USER nobody
