"""A small hybrid GPT (3 Gated DeltaNet layers : 1 full-attention layer) built from our block spec,
trained for a few steps on random tokens. Runs on CPU (gloo) or GPU (NCCL), alone or under torchrun.

    python examples/hybrid_gpt.py                                   # 1 process, CPU
    torchrun --nproc-per-node 2 examples/hybrid_gpt.py --tp 2       # tensor parallel over 2 ranks
    torchrun --nproc-per-node 2 examples/hybrid_gpt.py --tp 2 --sequence-parallel

Prints the loss and tokens/s of every step (rank 0). Without Transformer Engine the spec uses
megatron-core's local modules; with it, TE's (`--spec-backend` chooses).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (= world size here)")
    p.add_argument("--sequence-parallel", action="store_true", help="Megatron's sequence parallelism (TP > 1)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--linear-attention-freq", type=int, default=4, help="every Nth layer is attention")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--qk-heads", type=int, default=2)
    p.add_argument("--v-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--spec-backend", default=None, choices=[None, "local", "transformer_engine"])
    return p.parse_args()


def init_distributed(tp: int):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise SystemExit(f"--tp ({tp}) must equal the number of processes (WORLD_SIZE={world}); "
                         f"launch with torchrun --nproc-per-node {tp}")
    cuda = torch.cuda.is_available()
    if not cuda:
        from qla_megatron.layers.cpu_compat import enable_megatron_on_cpu
        enable_megatron_on_cpu()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # a single process without torchrun
        tmp = tempfile.mkdtemp(prefix="qla_example_")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)     # the rendezvous file goes at exit
        path = os.path.join(tmp, "init")
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{path}", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(1234)
    else:
        from qla_megatron.layers.cpu_compat import seed_model_parallel_rng
        seed_model_parallel_rng(1234, parallel_state.get_tensor_model_parallel_rank())
    return ProcessGroupCollection.use_mpu_process_groups(), ("cuda" if cuda else "cpu")


def main():
    args = parse_args()
    pg, device = init_distributed(args.tp)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from qla_megatron.layers import get_hybrid_block_spec

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=4 * args.hidden, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", linear_num_key_heads=args.qk_heads, linear_num_value_heads=args.v_heads,
        linear_key_head_dim=args.head_dim, linear_value_head_dim=args.head_dim, linear_conv_kernel_dim=4,
        linear_attention_freq=args.linear_attention_freq, tensor_model_parallel_size=args.tp,
        sequence_parallel=args.sequence_parallel,
        use_cpu_initialization=device == "cpu", hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config, transformer_layer_spec=get_hybrid_block_spec(config, backend=args.spec_backend),
                     vocab_size=args.vocab, max_sequence_length=args.seq, position_embedding_type="rope",
                     pg_collection=pg).to(device)
    rank0 = dist.get_rank() == 0
    if rank0:
        kinds = [type(layer.self_attention).__name__ for layer in model.decoder.layers]
        print(f"layers: {kinds}; parameters per rank: {sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
    position_ids = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    for step in range(args.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], position_ids, attention_mask=None, labels=tokens[:, 1:]).mean()
        loss.backward()
        if args.sequence_parallel:  # SP norm weights hold partial gradients: sum them over TP
            for p in model.parameters():
                if getattr(p, "sequence_parallel", False):
                    dist.all_reduce(p.grad, group=pg.tp)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if rank0:
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}, "
                  f"{args.batch * args.seq / dt:,.0f} tokens/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
