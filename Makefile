# The two entry points (see README): `make run` and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup run test test-gpu bench-cpu

setup:
	bash scripts/setup_env.sh

run: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest tests -q

bench-cpu: setup
	$(PY) benchmarks/bench_torch_op.py
