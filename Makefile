# The two commands of the README. Each creates .venv/ on first use (scripts/bootstrap.sh).
.PHONY: demo test venv

venv:
	@bash scripts/bootstrap.sh

demo: venv
	.venv/bin/torchrec-multihash demo

test: venv
	.venv/bin/python -m pytest -q tests
