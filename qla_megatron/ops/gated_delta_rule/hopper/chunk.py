"""Plan and launchers of the Hopper path; the forward: prepare -> (summary -> compose ->) forward.

    prepare   per (chunk, v-head): the chunk factors Ai, P, F (prepare.py)
    summary   per (column block of [M | S_ext], v-head, segment with a successor): the segment's (S_ext, M);
              gate-driven where the decay over its last warmup_chunks chunks allows:
              (0, the end state of those chunks from zero) instead (forward.py's docstring)
    compose   S_start[j + 1] = M_j S_start[j] + S_ext[j] along each sequence: segments.compose with
              backend "tilelang" (compose.py: fp32, one launch)
    forward   per (value block, v-head, segment): o, end state, optional per-chunk states

Without intra-card CP (one segment per sequence) only prepare and forward run. The plan (segs,
sum_segs, the walks) is segment_plan's, the one plan of the segment mechanism, in its one table
layout (KernelTables): batch rows take the host plan, built once per shape and cached; packed
sequences build theirs on the device from cu_seqlens (hopper/packed_plan.py, the Triton twin of
segment_plan.packed_tables, with padding rows the kernels skip), so neither waits for the device.
The segment length comes from shapes only (intra_cp.plan_segment_len for batch rows,
intra_cp.packed_segment_len for packed sequences).

The backward (backward.py) runs the dual on the same plan: the states pass, (backward summary ->
compose ->) the adjoint walk, the gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..intra_cp import IntraCPConfig, packed_segment_len, plan_segment_len
from .. import segments
from ..segment_plan import KernelTables, WalkTables, packed_tables, plan_segments
from .packed_plan import packed_tables_device
from .compose import compose_kernel
from .backward_dh import backward_dh_kernel
from .backward_grads import backward_grads_kernel
from .forward import CHUNK, forward_kernel
from .prepare import prepare_kernel

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
COMPOSE_BVC = 16     # state columns per compose_kernel program
BV_MAIN = 128        # forward / backward_dh: two consumer warpgroups, 64 state columns each (64: one, for V = 64)
# What the kernels were verified for on an H100 / H200 (tests/ops/test_hopper_*.py): the backend serves
# nothing else.
VERIFIED = dict(V=(64, 128, 256), dtypes=(torch.bfloat16, torch.float16))
# V the backward serves: backward_grads.py reuses [C, V] fragments for [C, K] products (V = K = 128),
# and holds S, dS [K, V] and four [C, V] tiles in shared memory (V = 256 would not fit).
BACKWARD_V = (128,)
# Tests fill every output with NaN before the kernels run (unwritten elements then show): poison_outputs().
_POISON = contextvars.ContextVar("qla_megatron_hopper_poison", default=False)


def bv_main(V: int) -> int:
    return BV_MAIN if V % BV_MAIN == 0 else 64


@contextlib.contextmanager
def poison_outputs():
    """Within this context every buffer the Hopper launchers allocate is filled with NaN first."""
    tok = _POISON.set(True)
    try:
        yield
    finally:
        _POISON.reset(tok)


def empty(*shape, dtype, device):
    if _POISON.get():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


def _make_plan(bounds: tuple, seg_len: Optional[int], device: torch.device) -> KernelTables:
    """The kernels' tables of one (sequence bounds, segment length): segment_plan's one plan, built
    once on the host and cached by shape (batch rows; packed sequences: segment_plan.packed_tables)."""
    return plan_segments(bounds, seg_len).kernel_tables(device)


def plan_for(B: int, T: int, cu_seqlens: Optional[torch.Tensor], HV: int, K: int, V: int,
             cfg: IntraCPConfig, device: torch.device) -> KernelTables:
    """The tables of a call, planned from shapes only: batch rows by the host plan cached per shape;
    packed sequences by packed_tables on the device (cu_seqlens is never read here)."""
    sms = _num_sms(device.index or 0)
    if cu_seqlens is None:
        seg_len = plan_segment_len([T] * B, HV, K, V, sms, BV=bv_main(V), config=cfg)
        seg_len = seg_len if seg_len is not None and seg_len < T else None
        return _make_plan(tuple(b * T for b in range(B + 1)), seg_len, device)
    N = cu_seqlens.numel() - 1
    seg_len = packed_segment_len(B * T, N, HV, K, V, sms, BV=bv_main(V), config=cfg)
    # On CUDA the Triton builder (six launches, not ~70 torch ops: the host's launch time was the
    # packed forward's at few heads); the torch builder elsewhere ('meta' in the tests). Same tables.
    build = packed_tables_device if cu_seqlens.is_cuda else packed_tables
    return build(cu_seqlens, B * T, seg_len)


def compose(walk: WalkTables, summ: torch.Tensor, z0: Optional[torch.Tensor], NS: int) -> torch.Tensor:
    """The Hopper implementation of segments.compose: one launch of compose_kernel (compose.py) for
    every sequence of the walk (its device tables). summ [NSS, HV, K, K + V] fp32, z0 [N, HV, K, V]
    fp32 or None; returns [NS, HV, K, V] fp32 (rows no walk names, the plan's padding rows, are not
    written)."""
    NSS, HV, K, W = summ.shape
    V = W - K
    kern = compose_kernel(HV, K, V, has_initial=z0 is not None, BVc=COMPOSE_BVC)
    out = empty(NS, HV, K, V, dtype=torch.float32, device=summ.device)
    dummy = summ.new_empty(1, HV, K, V)
    kern(summ, z0 if z0 is not None else dummy, walk.meta, walk.srow, walk.zrow, out)
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def prepare_heads(H: int, HV: int) -> dict:
    """prepare_kernel's head grouping. A program takes HP v-heads of one qk-head, which is loaded and
    multiplied once for all of them: HP = 4, 3 or 2 where it divides HV / H (4 and 3 on 256 threads).
    Per v-head the loads dominate: at 1 x 32768 on an H100, 48/16 0.870 -> 0.560 ms (HP 1 -> 3), 64/16
    0.756 -> 0.642 (HP 2 -> 4), 32/8 0.382 -> 0.329 (benchmarks/results/prepare_rs_heads_h100.md).
    With one v-head per qk-head (HV = H), two a program still, each in its own qk-head pass, so the
    substitution keeps all 128 threads busy, at 2 blocks an SM (no register cap, no spills): 0.503 vs
    0.576 ms at 32/32."""
    GQ = HV // H
    for hp in (4, 3, 2):
        if GQ % hp == 0:
            return dict(HP=hp, share_qk=True)
    if GQ == 1 and HV % 2 == 0:
        return dict(HP=2, share_qk=False, min_blocks=2)
    return dict(HP=1, share_qk=True)


def prepare(q, k, g, beta, chunks, HV, scale, l2norm):
    """Launch prepare_kernel. q, k [Tt, H, K] dtype, g, beta [Tt, HV] fp32.
    Returns Ai, P [NC, HV, C, C] dtype and F [NC, HV, 5, C] fp32 (prepare.py)."""
    Tt, H, K = k.shape
    NC = chunks.shape[0]
    kern = prepare_kernel(H, HV, K, _DTYPES[k.dtype], l2norm=l2norm, **prepare_heads(H, HV))
    Ai = empty(NC, HV, CHUNK, CHUNK, dtype=k.dtype, device=k.device)
    P = empty(NC, HV, CHUNK, CHUNK, dtype=k.dtype, device=k.device)
    F = empty(NC, HV, 5, CHUNK, dtype=torch.float32, device=k.device)
    kern(q, k, g, beta, chunks, float(scale), Ai, P, F)
    return Ai, P, F


def forward(q, k, v, Ai, P, F, segs, *, h0=None, n_final=0, summary=False, states=None, gate_chunks=0,
            emit_o=True):
    """Launch forward_kernel over the segments in `segs`. Returns (o or None, ht [n_final, HV, K, W] or
    None), W = K + V in summary mode, else V. summary: the [M | S_ext] pass; gate_chunks > 0 (summary
    only): gate-driven, with warm-ups of that many chunks; states [NC, HV, K, V]: written with every
    chunk's start state; emit_o=False: the states-only walk (forward.py)."""
    Tt, H, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    kern = forward_kernel(H, HV, K, V, _DTYPES[k.dtype], summary=summary, has_initial=h0 is not None,
                          store_final=n_final > 0, save_states=states is not None, gate_chunks=gate_chunks,
                          emit_o=emit_o, BV=bv_main(V))
    W = K + V if summary else V
    dummy = torch.empty(1, HV, K, W, dtype=torch.float32, device=q.device)
    ht = empty(n_final, HV, K, W, dtype=torch.float32, device=q.device) if n_final else dummy
    out = emit_o and not summary
    o = empty(Tt, HV, V, dtype=q.dtype, device=q.device) if out else q.new_empty(1, HV, V)   # not written
    st = states if states is not None else q.new_empty(1, HV, K, V)
    kern(q, k, v, Ai, P, F, segs, h0 if h0 is not None else dummy, o, ht, st)
    return (o if out else None), (ht if n_final else None)


def summarize(q, k, v, Ai, P, F, plan: KernelTables, *, gate_chunks: int = 0) -> torch.Tensor:
    """The Hopper summary pass (segments.summarize's counterpart on the kernels): [M | S_ext]
    [NSS, HV, K, K + V] fp32 of every segment with a successor (plan.sum_segs), gate-driven with
    warm-ups of gate_chunks chunks (0: exact), from the chunk factors of prepare()."""
    NSS = plan.sum_segs.shape[0]
    return forward(q, k, v, Ai, P, F, plan.sum_segs, n_final=NSS, summary=True, gate_chunks=gate_chunks)[1]


@dataclass
class ForwardSaved:
    """What the forward keeps for the backward besides its inputs (bytes per token and v-head at
    K = V = 128, bf16: Ai and P 128 each, F 20): the chunk factors, so the backward does not rebuild
    them, and the start state of every main-pass segment (fp32, one [K, V] a segment and v-head), from
    which the backward's states pass recomputes every chunk's start state in bf16."""
    plan: KernelTables
    config: IntraCPConfig
    Ai: torch.Tensor
    P: torch.Tensor
    F: torch.Tensor
    starts: Optional[torch.Tensor]     # [NS or N, HV, K, V] fp32 rows of plan.segs[:, 3], or None (zeros)
    scale: float
    n_seqs: int                        # N: sequences (batch rows, or cu_seqlens entries - 1)


def flat_inputs(q, k, v, g, beta):
    """The token-major views the kernels read: q, k [Tt, H, K], v [Tt, HV, V] contiguous in their
    dtype; g, beta [Tt, HV] fp32."""
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    return (q.reshape(B * T, H, K).contiguous(), k.reshape(B * T, H, K).contiguous(),
            v.reshape(B * T, HV, V).contiguous(), g.reshape(B * T, HV).float().contiguous(),
            beta.reshape(B * T, HV).float().contiguous())


@dataclass
class Prepared:
    """The forward's first stage (forward_prepare): the plan, the token-major inputs and the chunk
    factors, from which forward_main runs the rest for given start states (cross-GPU CP summarises
    its pieces from the same factors in between: hopper/pieces.py)."""
    plan: KernelTables
    config: IntraCPConfig
    flat: tuple                        # qf, kf, vf, gf, bf (flat_inputs)
    Ai: torch.Tensor
    P: torch.Tensor
    F: torch.Tensor
    scale: float
    n_seqs: int
    shape: tuple                       # (B, T, HV, V) of the output


def forward_prepare(q, k, v, g, beta, scale, cu_seqlens, use_qk_l2norm_in_kernel,
                    intra_cp: Optional[IntraCPConfig] = None,
                    planned: Optional[Tuple[KernelTables, int]] = None) -> Prepared:
    """Plan (plan_for from the shapes and cu_seqlens, or `planned` = (tables, number of sequences)
    where the caller planned on the host; cu_seqlens is then not read) and prepare."""
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    cfg = intra_cp if intra_cp is not None else IntraCPConfig.from_env()
    if planned is not None:
        plan, N = planned
    else:
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        plan = plan_for(B, T, cu_seqlens, HV, K, V, cfg, k.device)
    flat = flat_inputs(q, k, v, g, beta)
    qf, kf, _, gf, bf = flat
    scale = K ** -0.5 if scale is None else float(scale)
    Ai, P, F = prepare(qf, kf, gf, bf, plan.chunks, HV, scale, bool(use_qk_l2norm_in_kernel))
    return Prepared(plan, cfg, flat, Ai, P, F, scale, N, (B, T, HV, V))


def forward_main(prep: Prepared, h0: Optional[torch.Tensor], output_final_state: bool,
                 save_for_backward: bool = False):
    """The rest of the forward from the sequences' start states h0 [N, HV, K, V] fp32 (None: zero):
    (summary -> compose ->) the main pass. Returns (o, final_state) and with save_for_backward the
    ForwardSaved."""
    plan, cfg = prep.plan, prep.config
    qf, kf, vf = prep.flat[:3]
    if plan.sum_segs is not None:
        summ = summarize(qf, kf, vf, prep.Ai, prep.P, prep.F, plan, gate_chunks=cfg.gate_chunks)
        h0 = segments.compose(plan.walk, summ, h0, plan.NS, backend="tilelang")
    o, ht = forward(qf, kf, vf, prep.Ai, prep.P, prep.F, plan.segs, h0=h0,
                    n_final=prep.n_seqs if output_final_state else 0)
    o = o.view(*prep.shape)
    if save_for_backward:
        return o, ht, ForwardSaved(plan, cfg, prep.Ai, prep.P, prep.F, h0, prep.scale, prep.n_seqs)
    return o, ht


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                               use_qk_l2norm_in_kernel, intra_cp: Optional[IntraCPConfig] = None,
                               save_for_backward: bool = False):
    """Hopper forward on validated inputs (see chunk.py for the arguments). Returns (o, final_state),
    and with save_for_backward a third item, the ForwardSaved the backward (backward.py) runs from."""
    prep = forward_prepare(q, k, v, g, beta, scale, cu_seqlens, use_qk_l2norm_in_kernel, intra_cp)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    return forward_main(prep, h0, output_final_state, save_for_backward)


def _gate_chunks(gate_chunks: Optional[int]) -> int:
    return gate_chunks if gate_chunks is not None else IntraCPConfig().gate_chunks


def kernel_set(H, HV, K, V, dtype=torch.bfloat16, l2norm=True, gate_chunks: Optional[int] = None,
               backward=True):
    """The kernels one (H, HV, K, V, dtype, l2norm) can need: [(factory name, args, kwargs)]. Sequence
    length and batch are symbolic, so this set serves every length. Order: prepare, the four main
    passes (h0 / final state with and without), the summary, the composition without and with an
    initial value, the fold of summaries (the composition K + V columns wide); with backward (and V in
    BACKWARD_V), then the states pass with and without h0, the backward summary, the adjoint walk with
    a terminal adjoint (with and without fp32 segment starts) and without, the gradients. Summaries
    are gate-driven with warm-ups of gate_chunks chunks (None: the default IntraCPConfig's; 0: exact)."""
    d = _DTYPES[dtype]
    gc = _gate_chunks(gate_chunks)
    task = (H, HV, K, V, d)
    main = dict(summary=False, BV=bv_main(V))
    items = [("prepare", (H, HV, K, d), dict(l2norm=l2norm, **prepare_heads(H, HV)))]
    items += [("forward", task, dict(main, has_initial=hi, store_final=sf))
              for hi, sf in ((False, True), (True, True), (True, False), (False, False))]
    items += [("forward", task, dict(summary=True, store_final=True, BV=bv_main(V), gate_chunks=gc))]
    items += [("compose", (HV, K, V), dict(has_initial=hi, BVc=COMPOSE_BVC)) for hi in (False, True)]
    # The fold of a piece's segment summaries (cross-GPU CP, segments.fold_summaries): a state K + V wide.
    items += [("compose", (HV, K, K + V), dict(has_initial=True, BVc=COMPOSE_BVC))]
    if backward and V in BACKWARD_V:
        items += [("forward", task, dict(main, has_initial=hi, store_final=False, save_states=True,
                                         emit_o=False)) for hi in (True, False)]
        items += [("backward_dh", task, dict(summary=True, gate_chunks=gc, BV=bv_main(V)))]
        items += [("backward_dh", task, dict(has_terminal=ht, has_initial=hi, BV=bv_main(V)))
                  for ht, hi in ((True, True), (True, False), (False, False))]
        items += [("backward_grads", task, dict(l2norm=l2norm))]
    return items


_FACTORIES = {"prepare": prepare_kernel, "forward": forward_kernel, "compose": compose_kernel,
              "backward_dh": backward_dh_kernel, "backward_grads": backward_grads_kernel}


def _compile_one(item):
    name, args, kwargs = item
    t = time.time()
    _FACTORIES[name](*args, **kwargs)
    return time.time() - t


def precompile(items, workers=8):
    """Compile kernels into TileLang's disk cache in parallel processes; returns the wall time."""
    import concurrent.futures as cf
    import multiprocessing as mp
    t = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_compile_one, items))
    return time.time() - t
