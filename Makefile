# The two commands of the README. Each creates .venv/ on first use (scripts/bootstrap.sh).
.PHONY: quickstart demo test venv

venv:
	@bash scripts/bootstrap.sh

quickstart: venv
	OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 -m torchrec_multihash.cli train \
		--config configs/quickstart.yaml --metrics-out runs/quickstart/metrics.json

demo: venv
	.venv/bin/torchrec-multihash demo

test: venv
	.venv/bin/python -m pytest -q tests
