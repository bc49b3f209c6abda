"""Forward plan of the Hopper path: prepare -> (summary -> compose ->) forward.

    prepare   per (chunk, v-head): G = cumsum g, beta masked, A = (I + StrictLower(diag(beta) K K^T))^-1
    summary   per (column block of [M | S_ext], v-head, segment with a successor): the segment's (S_ext, M)
    compose   S_start[j + 1] = M_j S_start[j] + S_ext[j] along each sequence (torch, fp32)
    forward   per (value block, v-head, segment): o, end state, optional per-chunk states

Without intra-card CP (one segment per sequence) only prepare and forward run.

Two forward kernels serve the same plan; QLA_MEGATRON_HOPPER_FORWARD picks one (read on every call):

    fused  (default) forward.py: TileLang's automatic warp specialization; verified on an H100
    ws     forward_ws.py: hand warp-specialized, the state-free half of chunk i + 1 overlapping chunk
           i's state chain, 1/||q|| from prepare (norm_q); compiled for sm_90a on a CPU only, not
           yet run on a GPU
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..inputs import sequence_bounds
from ..intra_cp import IntraCPConfig, plan_segment_len
from .forward import CHUNK, forward_kernel
from .forward_ws import forward_ws_kernel
from .prepare import prepare_kernel

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
BV = 64
# Kernel config: issue independent wgmma together (True) or one synchronous T.gemm at a time (False);
# QLA_MEGATRON_HOPPER_SYNC_MMA=1 selects the latter (kept for A/B timing).
ASYNC_MMA = os.environ.get("QLA_MEGATRON_HOPPER_SYNC_MMA", "0") != "1"
# Forward kernel variant (see the module docstring); the default is the GPU-verified kernel.
FORWARD_ENV = "QLA_MEGATRON_HOPPER_FORWARD"
FORWARD_VARIANTS = {"fused": forward_kernel, "ws": forward_ws_kernel}
# Tests set this to fill every output with NaN before the kernels run (unwritten elements then show).
POISON_OUTPUTS = False


def forward_variant(variant: Optional[str] = None) -> str:
    """The forward kernel variant: `variant` if given, else $QLA_MEGATRON_HOPPER_FORWARD, else "fused"."""
    name = variant if variant is not None else os.environ.get(FORWARD_ENV, "") or "fused"
    if name not in FORWARD_VARIANTS:
        src = "variant" if variant is not None else FORWARD_ENV
        raise ValueError(f"{src}={name!r} is not a Hopper forward variant; choose one of "
                         f"{sorted(FORWARD_VARIANTS)}")
    return name


def forward_factory(variant: Optional[str] = None):
    """The @tilelang.jit factory of the forward kernel variant (see forward_variant)."""
    return FORWARD_VARIANTS[forward_variant(variant)]


def _empty(*shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class _Plan:
    chunks: torch.Tensor        # [NC, 2] int32: first token, valid tokens
    segs: torch.Tensor          # [NS, 5] int32 for the main pass
    sum_segs: Optional[torch.Tensor]   # [NSS, 5] for the summary pass, or None
    compose_steps: tuple        # ((summary rows, from seg rows, to seg rows), ...) as device tensors
    first_rows: Optional[torch.Tensor]  # seg row of every sequence's first segment [N]
    NC: int
    NS: int


@functools.lru_cache(maxsize=64)
def _make_plan(bounds: tuple, seg_len: Optional[int], device: torch.device) -> _Plan:
    C = CHUNK
    N = len(bounds) - 1
    chunks, seq_first_chunk = [], []
    for n in range(N):
        seq_first_chunk.append(len(chunks))
        for t in range(bounds[n], bounds[n + 1], C):
            chunks.append((t, min(C, bounds[n + 1] - t)))
    # Segments: (start, end, first chunk, sequence, index within sequence).
    pieces = []
    for n in range(N):
        L = bounds[n + 1] - bounds[n]
        step = seg_len if seg_len else L
        for j, s in enumerate(range(bounds[n], bounds[n + 1], step)):
            pieces.append((s, min(s + step, bounds[n + 1]), seq_first_chunk[n] + (s - bounds[n]) // C, n, j))
    last_j = {}
    for p in pieces:
        last_j[p[3]] = max(last_j.get(p[3], -1), p[4])
    # Longest segments first: the grid's last programs are then the short ones.
    order = sorted(range(len(pieces)), key=lambda i: -(pieces[i][1] - pieces[i][0]))
    seg_row = {(pieces[i][3], pieces[i][4]): r for r, i in enumerate(order)}
    segs = []
    for i in order:
        s, e, c0, n, j = pieces[i]
        init_row = seg_row[(n, j)] if seg_len else n
        out_row = n if j == last_j[n] else -1
        segs.append((s, e, c0, init_row, out_row))
    sum_segs, steps, first_rows = None, (), None
    if seg_len and any(v > 0 for v in last_j.values()):
        sp = [p for p in pieces if p[4] < last_j[p[3]]]
        sum_row = {(p[3], p[4]): r for r, p in enumerate(sp)}
        sum_segs = torch.tensor([(s, e, c0, 0, sum_row[(n, j)]) for s, e, c0, n, j in sp],
                                dtype=torch.int32).to(device)
        maxj = max(last_j.values())
        step_list = []
        for j in range(maxj):
            ns = [n for n in range(N) if last_j[n] > j]
            step_list.append(tuple(torch.tensor(x, dtype=torch.long).to(device) for x in (
                [sum_row[(n, j)] for n in ns], [seg_row[(n, j)] for n in ns],
                [seg_row[(n, j + 1)] for n in ns])))
        steps = tuple(step_list)
        first_rows = torch.tensor([seg_row[(n, 0)] for n in range(N)], dtype=torch.long).to(device)
    return _Plan(chunks=torch.tensor(chunks, dtype=torch.int32).to(device),
                 segs=torch.tensor(segs, dtype=torch.int32).to(device), sum_segs=sum_segs,
                 compose_steps=steps, first_rows=first_rows, NC=len(chunks), NS=len(segs))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def prepare(k, g, beta, chunks, HV, l2norm=False, q=None):
    """Launch prepare_kernel. k [Tt, H, K] (dtype), g, beta [Tt, HV] fp32, chunks [NC, 2] int32.
    Returns Gc, Bc, Rk [NC, HV, C] fp32 (Rk = 1 / ||k|| with l2norm, else unwritten) and A; given q
    (with l2norm: the ws forward's norm_q), also Rq [NC, HV, C] = 1 / ||q|| as a fifth."""
    Tt, H, K = k.shape
    NC = chunks.shape[0]
    if q is not None:
        return _prepare_norm_q(q, k, g, beta, chunks, HV)
    kern = prepare_kernel(H, HV, K, _DTYPES[k.dtype], l2norm=l2norm)
    Gc = _empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device)
    Bc = _empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device)
    Rk = _empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device) if l2norm else \
        torch.empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device)
    A = _empty(NC, HV, CHUNK, CHUNK, dtype=k.dtype, device=k.device)
    kern(k, g, beta, chunks, Gc, Bc, Rk, A)
    return Gc, Bc, Rk, A


def _prepare_norm_q(q, k, g, beta, chunks, HV):
    Tt, H, K = k.shape
    NC = chunks.shape[0]
    kern = prepare_kernel(H, HV, K, _DTYPES[k.dtype], l2norm=True, norm_q=True)
    Gc, Bc, Rk, Rq = (_empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device) for _ in range(4))
    A = _empty(NC, HV, CHUNK, CHUNK, dtype=k.dtype, device=k.device)
    kern(q, k, g, beta, chunks, Gc, Bc, Rk, A, Rq)
    return Gc, Bc, Rk, A, Rq


def forward(q, k, v, Gc, Bc, Rk, A, segs, scale, *, h0=None, n_final=0, summary=False, states=None,
            l2norm=False, variant="fused", Rq=None):
    """Launch the forward kernel `variant` over the segments in `segs`; "ws" also takes Rq (1 / ||q||
    from prepare, read with l2norm). Returns ht [n_final, HV, K, W] or None."""
    Tt, H, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    Wd = K + V if summary else V
    dev = k.device
    if variant == "ws":
        kern = forward_ws_kernel(H, HV, K, V, _DTYPES[k.dtype], summary=summary, has_initial=h0 is not None,
                                 store_final=n_final > 0, save_states=states is not None, l2norm=l2norm, BV=BV)
    else:
        kern = forward_kernel(H, HV, K, V, _DTYPES[k.dtype], summary=summary, has_initial=h0 is not None,
                              store_final=n_final > 0, save_states=states is not None, l2norm=l2norm,
                              BV=BV, async_mma=ASYNC_MMA)
    dummy = torch.empty(1, HV, K, Wd, dtype=torch.float32, device=dev)
    ht = _empty(n_final, HV, K, Wd, dtype=torch.float32, device=dev) if n_final else dummy
    # Summary mode writes no o, but the kernel's o shares the symbolic token count with q.
    o = _empty(Tt, HV, V, dtype=q.dtype, device=dev) if not summary else \
        torch.empty(Tt, HV, V, dtype=q.dtype, device=dev)
    st = states if states is not None else torch.empty(1, HV, K, V, dtype=q.dtype, device=dev)
    if variant == "ws":
        # Without l2norm the kernel reads no Rq; Rk (same shape) stands in for the argument.
        kern(q, k, v, Gc, Bc, Rk, Rq if Rq is not None else Rk, A, segs, h0 if h0 is not None else dummy,
             float(scale), o, ht, st)
    else:
        kern(q, k, v, Gc, Bc, Rk, A, segs, h0 if h0 is not None else dummy, float(scale), o, ht, st)
    return o, (ht if n_final else None)


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                               use_qk_l2norm_in_kernel, intra_cp: Optional[IntraCPConfig] = None,
                               variant: Optional[str] = None):
    """Hopper forward on validated inputs (see chunk.py for the arguments). Returns (o, final_state).
    `variant` picks the forward kernel ("fused" or "ws"); None reads $QLA_MEGATRON_HOPPER_FORWARD."""
    variant = forward_variant(variant)
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    dev = k.device
    bounds = tuple(sequence_bounds(B, T, cu_seqlens))
    N = len(bounds) - 1
    lens = [bounds[n + 1] - bounds[n] for n in range(N)]
    seg_len = plan_segment_len(lens, HV, K, V, _num_sms(dev.index or 0), BV=BV, config=intra_cp)
    if seg_len is not None and seg_len >= max(lens):
        seg_len = None
    plan = _make_plan(bounds, seg_len, dev)

    qf, kf = q.reshape(B * T, H, K).contiguous(), k.reshape(B * T, H, K).contiguous()
    l2 = bool(use_qk_l2norm_in_kernel)   # fused: the kernels scale by 1 / ||q||, 1 / ||k||
    vf = v.reshape(B * T, HV, V).contiguous()
    gf = g.reshape(B * T, HV).float().contiguous()
    bf = beta.reshape(B * T, HV).float().contiguous()
    scale = K ** -0.5 if scale is None else float(scale)
    h0 = initial_state.float().contiguous() if initial_state is not None else None

    Rq = None
    if variant == "ws" and l2:
        Gc, Bc, Rk, A, Rq = prepare(kf, gf, bf, plan.chunks, HV, l2norm=l2, q=qf)
    else:
        Gc, Bc, Rk, A = prepare(kf, gf, bf, plan.chunks, HV, l2norm=l2)
    if plan.sum_segs is not None:
        _, summ = forward(qf, kf, vf, Gc, Bc, Rk, A, plan.sum_segs, scale, n_final=plan.sum_segs.shape[0],
                          summary=True, l2norm=l2, variant=variant, Rq=Rq)
        M, ext = summ[..., :K], summ[..., K:]
        starts = torch.zeros(plan.NS, HV, K, V, dtype=torch.float32, device=dev)
        if h0 is not None:
            starts[plan.first_rows] = h0
        for sum_rows, cur, nxt in plan.compose_steps:
            starts[nxt] = torch.matmul(M[sum_rows], starts[cur]) + ext[sum_rows]
        h0 = starts
    o, ht = forward(qf, kf, vf, Gc, Bc, Rk, A, plan.segs, scale, h0=h0,
                    n_final=N if output_final_state else 0, l2norm=l2, variant=variant, Rq=Rq)
    return o.view(B, T, HV, V), ht


def forward_set(H, HV, K, V, dtype=torch.bfloat16, l2norm=True, variant="fused"):
    """The kernels one (H, HV, K, V, dtype, l2norm) can need: [(factory, args, kwargs)]. Sequence
    length and batch are symbolic, so this set serves every length. Same order for both variants."""
    d = _DTYPES[dtype]
    if variant == "ws":
        main = dict(summary=False, BV=BV, l2norm=l2norm)
        return [("prepare", (H, HV, K, d), dict(l2norm=l2norm, norm_q=l2norm)),
                ("forward_ws", (H, HV, K, V, d), dict(main, has_initial=False, store_final=True)),
                ("forward_ws", (H, HV, K, V, d), dict(main, has_initial=True, store_final=True)),
                ("forward_ws", (H, HV, K, V, d), dict(main, has_initial=True, store_final=False)),
                ("forward_ws", (H, HV, K, V, d), dict(main, has_initial=False, store_final=False)),
                ("forward_ws", (H, HV, K, V, d), dict(summary=True, store_final=True, BV=BV, l2norm=l2norm))]
    main = dict(summary=False, BV=BV, async_mma=ASYNC_MMA, l2norm=l2norm)
    return [("prepare", (H, HV, K, d), dict(l2norm=l2norm)),
            ("forward", (H, HV, K, V, d), dict(main, has_initial=False, store_final=True)),
            ("forward", (H, HV, K, V, d), dict(main, has_initial=True, store_final=True)),
            ("forward", (H, HV, K, V, d), dict(main, has_initial=True, store_final=False)),
            ("forward", (H, HV, K, V, d), dict(main, has_initial=False, store_final=False)),
            ("forward", (H, HV, K, V, d), dict(summary=True, store_final=True, BV=BV, async_mma=ASYNC_MMA,
                                               l2norm=l2norm))]


def _compile_one(item):
    name, args, kwargs = item
    factory = {"prepare": prepare_kernel, "forward": forward_kernel, "forward_ws": forward_ws_kernel}[name]
    t = time.time()
    factory(*args, **kwargs)
    return time.time() - t


def precompile(items, workers=8):
    """Compile kernels into TileLang's disk cache in parallel processes; returns the wall time."""
    import concurrent.futures as cf
    import multiprocessing as mp
    t = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_compile_one, items))
    return time.time() - t
