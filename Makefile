# The two entry points (see README): `make run` and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup run test test-gpu bench-cpu

setup:
	bash scripts/setup_env.sh

# The recipe's CPU default: corpus -> indexed dataset, then the tiny hybrid on 2 gloo ranks (TP = 2),
# from scratch (the previous run's checkpoints are removed), checkpoints in build/recipe/checkpoints.
RUN_DIR := build/recipe
run: setup
	rm -rf $(RUN_DIR)/checkpoints
	$(PY) examples/build_corpus.py --out $(RUN_DIR)/corpus_text_document
	OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 examples/pretrain_gdn.py \
	    --config examples/configs/tiny_cpu.args --tensor-model-parallel-size 2 \
	    --data-path $(RUN_DIR)/corpus_text_document --save $(RUN_DIR)/checkpoints

test: setup
	$(PY) -m pytest tests -q

bench-cpu: setup
	$(PY) benchmarks/bench_torch_op.py
