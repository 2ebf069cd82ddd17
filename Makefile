# The commands of the README. Each creates .venv/ on first use (scripts/bootstrap.sh).
.PHONY: quickstart demo test test-fast lint format typecheck venv image image-push

venv:
	@bash scripts/bootstrap.sh

quickstart: venv
	PATH="$(CURDIR)/.venv/bin:$$PATH" torchx run -s local_cwd launch/components.py:dlrm -j 1x2 \
		--config configs/quickstart.yaml --metrics_out runs/quickstart/metrics.json

demo: venv
	.venv/bin/torchrec-multihash demo

# PYTEST_WORKERS: parallel test processes (pytest-xdist); 2 fits the 2-core CI machine
PYTEST_WORKERS ?= 2
test: venv
	.venv/bin/python -m pytest -q -n $(PYTEST_WORKERS) tests

# the tests not marked slow (no trainings in subprocesses, no multi-process runs): about 3 minutes
test-fast: venv
	.venv/bin/python -m pytest -q -m "not slow" tests

# Static checks: ruff's formatter and linter (pyproject.toml's [tool.ruff]) on the repository, then mypy
# (setup.cfg's [mypy]) on the package; `make format` applies the formatter.
lint: venv
	.venv/bin/python -m ruff format --check .
	.venv/bin/python -m ruff check .
	.venv/bin/python -m mypy torchrec_multihash

format: venv
	.venv/bin/python -m ruff format .
	.venv/bin/python -m ruff check --fix .

typecheck: venv
	.venv/bin/python -m mypy torchrec_multihash

# The CUDA image of Kubernetes jobs (Dockerfile; the stack of scripts/bootstrap.sh's cuda variant):
#   make image IMAGE=ghcr.io/you/torchrec-multihash:1 && make image-push IMAGE=ghcr.io/you/torchrec-multihash:1
IMAGE ?= torchrec-multihash:latest
DOCKER ?= docker

image:
	$(DOCKER) build -t $(IMAGE) .

image-push:
	$(DOCKER) push $(IMAGE)
