"""Pretrain a Qwen3.5-like hybrid (3 Gated DeltaNet layers : 1 full-attention layer) on megatron-core's
training stack, with our GDN layer (or megatron-core's, --gdn-impl megatron, for comparison).

    # GPU, one H200: the ~4B config at 32k tokens (examples/launch/ has TP 1-8, CP, 32k-256k)
    torchrun --nproc-per-node 1 examples/pretrain_gdn.py --config examples/configs/qwen35_4b.args \
        --seq-length 32768 --max-position-embeddings 32768 --mock-data --train-iters 20
    # CPU (what `make run` does): the tiny config on two gloo ranks, TP = 2, real data
    torchrun --nproc-per-node 2 examples/pretrain_gdn.py --config examples/configs/tiny_cpu.args \
        --tensor-model-parallel-size 2 --data-path data/corpus_text_document --save /tmp/ckpt

Every Megatron flag works (--tensor-model-parallel-size, --context-parallel-size, --sequence-parallel,
--seq-length, --micro-batch-size, --global-batch-size, --mock-data, --data-path, --save, --load,
--save-interval, --exit-interval, ...); ours are listed under "qla_megatron recipe" in --help.
On a GPU this runs megatron.training's `pretrain`; without CUDA the recipe's CPU loop
(qla_megatron/training/cpu_loop.py) on the same model provider, optimizer and checkpoint format.
"""

from __future__ import annotations

import sys

from qla_megatron.training.launch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
