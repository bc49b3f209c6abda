"""Forward plan of the Hopper path: prepare -> (summary -> compose ->) forward.

    prepare   per (chunk, v-head): the cumulative gate, A = (I + StrictLower(diag(beta) K K^T))^-1 and,
              for the rs kernel, the chunk factors Ag, P, F it reads (prepare_rs.py)
    summary   per (column block of [M | S_ext], v-head, segment with a successor): the segment's (S_ext, M);
              gate-driven (rs, the default) where the decay over its last warmup_chunks chunks allows:
              (0, the end state of those chunks from zero) instead (forward_rs.py's docstring)
    compose   S_start[j + 1] = M_j S_start[j] + S_ext[j] along each sequence (compose.py: fp32, one launch)
    forward   per (value block, v-head, segment): o, end state, optional per-chunk states

Without intra-card CP (one segment per sequence) only prepare and forward run.

Two forward kernels serve the same plan; QLA_MEGATRON_HOPPER_FORWARD picks one (read on every call):

    rs     (default) forward_rs.py: the state transposed in registers, every chain product in wgmma's
           register-operand form; verified on an H100 (all GPU tests, incl. V = 64 / 256 and fp16);
           its forward pass without intra-CP took 1.56 ms against fused's 2.79 at 32/16 x 32k
    fused  forward.py: TileLang's automatic warp specialization; verified on an H100 for bf16, V = 128
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
from .compose import compose_kernel
from .forward import CHUNK, forward_kernel
from .forward_rs import forward_rs_kernel
from .prepare import prepare_kernel
from .prepare_rs import prepare_rs_kernel

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
BV = 64
COMPOSE_BVC = 16     # state columns per compose_kernel program
BV_RS = 128          # forward_rs: two consumer warpgroups, 64 state columns each (64: one, for V = 64)


def bv_rs(V: int) -> int:
    return BV_RS if V % BV_RS == 0 else 64


# Kernel config: issue independent wgmma together (True) or one synchronous T.gemm at a time (False);
# QLA_MEGATRON_HOPPER_SYNC_MMA=1 selects the latter (kept for A/B timing).
ASYNC_MMA = os.environ.get("QLA_MEGATRON_HOPPER_SYNC_MMA", "0") != "1"
# Forward kernel variant (see the module docstring); the default is the fastest GPU-verified kernel.
FORWARD_ENV = "QLA_MEGATRON_HOPPER_FORWARD"
FORWARD_VARIANTS = {"fused": forward_kernel, "rs": forward_rs_kernel}
DEFAULT_FORWARD = "rs"
# What each variant was verified for on an H100 (tests/ops/test_hopper_forward.py): the backend serves
# nothing else with it.
VERIFIED = {"rs": dict(V=(64, 128, 256), dtypes=(torch.bfloat16, torch.float16)),
            "fused": dict(V=(128,), dtypes=(torch.bfloat16,))}
# Tests set this to fill every output with NaN before the kernels run (unwritten elements then show).
POISON_OUTPUTS = False


def forward_variant(variant: Optional[str] = None) -> str:
    """The forward kernel variant: `variant` if given, else $QLA_MEGATRON_HOPPER_FORWARD, else DEFAULT."""
    name = variant if variant is not None else os.environ.get(FORWARD_ENV, "") or DEFAULT_FORWARD
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
    NC: int
    NS: int
    # The composition's walk (compose.py; compose_starts), per sequence: (J, h0 row), the summary row
    # of step j, the main-pass row of segment j. None without summaries.
    comp_meta: Optional[torch.Tensor] = None   # [N, 2] int32
    comp_srow: Optional[torch.Tensor] = None   # [N, max J] int32
    comp_zrow: Optional[torch.Tensor] = None   # [N, max J + 1] int32


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
    sum_segs, comp = None, {}
    if seg_len and any(v > 0 for v in last_j.values()):
        # One summary row per segment that has a successor.
        maxj = max(last_j.values())
        sum_row = {(p[3], p[4]): r for r, p in enumerate(p for p in pieces if p[4] < last_j[p[3]])}
        pos = {(p[3], p[4]): p for p in pieces}
        sum_segs = torch.tensor([(*pos[nj][:3], 0, r) for nj, r in sum_row.items()], dtype=torch.int32).to(device)
        meta = [(last_j[n], n) for n in range(N)]
        srow = [[sum_row.get((n, j), 0) for j in range(maxj)] for n in range(N)]
        zrow = [[seg_row.get((n, j), 0) for j in range(maxj + 1)] for n in range(N)]
        comp = dict(comp_meta=torch.tensor(meta, dtype=torch.int32).to(device),
                    comp_srow=torch.tensor(srow, dtype=torch.int32).to(device),
                    comp_zrow=torch.tensor(zrow, dtype=torch.int32).to(device))
    return _Plan(chunks=torch.tensor(chunks, dtype=torch.int32).to(device),
                 segs=torch.tensor(segs, dtype=torch.int32).to(device), sum_segs=sum_segs,
                 NC=len(chunks), NS=len(segs), **comp)


def compose_starts(plan: _Plan, summ: torch.Tensor, h0: Optional[torch.Tensor], K: int) -> torch.Tensor:
    """Start state of every main-pass segment from the segment summaries (DESIGN §2), in fp32, in
    torch, one sequence and step at a time: the reference of compose_kernel (the op launches that,
    through compose()). Z[n, j + 1] = M[n, j] Z[n, j] + S_ext[n, j], Z[n, 0] = h0[n] (or 0).
    summ [NSS, HV, K, K + V] from the summary pass; h0 [N, HV, K, V] or None. Returns [NS, HV, K, V]
    in the main pass's row order. Gate-driven summaries need nothing here: theirs are
    (M = 0, S_ext = warm-up state)."""
    NSS, HV, _, W = summ.shape
    out = summ.new_empty(plan.NS, HV, K, W - K)
    for (J, n), srow, zrow in zip(plan.comp_meta.tolist(), plan.comp_srow.tolist(), plan.comp_zrow.tolist()):
        z = h0[n] if h0 is not None else summ.new_zeros(HV, K, W - K)
        out[zrow[0]] = z
        for j in range(J):
            m = summ[srow[j]]
            z = torch.baddbmm(m[..., K:], m[..., :K], z)
            out[zrow[j + 1]] = z
    return out


def compose(plan: _Plan, summ: torch.Tensor, h0: Optional[torch.Tensor]) -> torch.Tensor:
    """compose_starts in one launch of compose_kernel (compose.py): the same [NS, HV, K, V] fp32."""
    NSS, HV, K, W = summ.shape
    V = W - K
    kern = compose_kernel(HV, K, V, has_initial=h0 is not None, BVc=COMPOSE_BVC)
    out = _empty(plan.NS, HV, K, V, dtype=torch.float32, device=summ.device)
    dummy = summ.new_empty(1, HV, K, V)
    kern(summ, h0 if h0 is not None else dummy, plan.comp_meta, plan.comp_srow, plan.comp_zrow, out)
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def prepare(k, g, beta, chunks, HV, l2norm=False):
    """Launch prepare_kernel. k [Tt, H, K] (dtype), g, beta [Tt, HV] fp32, chunks [NC, 2] int32.
    Returns Gc, Bc, Rk [NC, HV, C] fp32 (Rk = 1 / ||k|| with l2norm, else unwritten) and A."""
    Tt, H, K = k.shape
    NC = chunks.shape[0]
    kern = prepare_kernel(H, HV, K, _DTYPES[k.dtype], l2norm=l2norm)
    Gc = _empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device)
    Bc = _empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device)
    Rk = _empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device) if l2norm else \
        torch.empty(NC, HV, CHUNK, dtype=torch.float32, device=k.device)
    A = _empty(NC, HV, CHUNK, CHUNK, dtype=k.dtype, device=k.device)
    kern(k, g, beta, chunks, Gc, Bc, Rk, A)
    return Gc, Bc, Rk, A


def prepare_heads(H: int, HV: int) -> dict:
    """prepare_rs_kernel's head grouping. A program takes HP v-heads of one qk-head, which is loaded and
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


def prepare_rs(q, k, g, beta, chunks, HV, scale, l2norm):
    """Launch prepare_rs_kernel. q, k [Tt, H, K] dtype, g, beta [Tt, HV] fp32.
    Returns Ag, P [NC, HV, C, C] dtype and F [NC, HV, 4, C] fp32."""
    Tt, H, K = k.shape
    NC = chunks.shape[0]
    kern = prepare_rs_kernel(H, HV, K, _DTYPES[k.dtype], l2norm=l2norm, **prepare_heads(H, HV))
    Ag = _empty(NC, HV, CHUNK, CHUNK, dtype=k.dtype, device=k.device)
    P = _empty(NC, HV, CHUNK, CHUNK, dtype=k.dtype, device=k.device)
    F = _empty(NC, HV, 4, CHUNK, dtype=torch.float32, device=k.device)
    kern(q, k, g, beta, chunks, float(scale), Ag, P, F)
    return Ag, P, F


def _pass_buffers(q, HV, K, V, n_final, summary, states):
    """What a forward or summary pass writes, for both kernels: (dummy h0 / ht [1, HV, K, W] fp32,
    ht [n_final, HV, K, W] fp32 (the dummy when n_final = 0), o [Tt, HV, V] (one unwritten row in
    summary mode), states (given, or a one-row dummy)); W = K + V in summary mode, else V."""
    Tt, dev = q.shape[0], q.device
    W = K + V if summary else V
    dummy = torch.empty(1, HV, K, W, dtype=torch.float32, device=dev)
    ht = _empty(n_final, HV, K, W, dtype=torch.float32, device=dev) if n_final else dummy
    o = _empty(Tt, HV, V, dtype=q.dtype, device=dev) if not summary else \
        torch.empty(1, HV, V, dtype=q.dtype, device=dev)          # not written
    st = states if states is not None else torch.empty(1, HV, K, V, dtype=q.dtype, device=dev)
    return dummy, ht, o, st


def forward_rs(q, k, v, Ag, P, F, segs, *, h0=None, n_final=0, summary=False, states=None, gate_chunks=0):
    """Launch forward_rs_kernel over the segments in `segs`. Returns (o, ht [n_final, HV, K, W] or None).
    summary: the [M | S_ext] pass; gate_chunks > 0 (summary only): gate-driven, with warm-ups of that
    many chunks (forward_rs.py)."""
    _, H, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    kern = forward_rs_kernel(H, HV, K, V, _DTYPES[k.dtype], summary=summary, has_initial=h0 is not None,
                             store_final=n_final > 0, save_states=states is not None, gate_chunks=gate_chunks,
                             BV=bv_rs(V))
    dummy, ht, o, st = _pass_buffers(q, HV, K, V, n_final, summary, states)
    kern(q, k, v, Ag, P, F, segs, h0 if h0 is not None else dummy, o, ht, st)
    return o, (ht if n_final else None)


def forward(q, k, v, Gc, Bc, Rk, A, segs, scale, *, h0=None, n_final=0, summary=False, states=None,
            l2norm=False):
    """Launch the "fused" forward kernel (forward.py) over the segments in `segs`.
    Returns (o, ht [n_final, HV, K, W] or None)."""
    _, H, K = k.shape
    HV, V = v.shape[1], v.shape[2]
    kern = forward_kernel(H, HV, K, V, _DTYPES[k.dtype], summary=summary, has_initial=h0 is not None,
                          store_final=n_final > 0, save_states=states is not None, l2norm=l2norm,
                          BV=BV, async_mma=ASYNC_MMA)
    dummy, ht, o, st = _pass_buffers(q, HV, K, V, n_final, summary, states)
    kern(q, k, v, Gc, Bc, Rk, A, segs, h0 if h0 is not None else dummy, float(scale), o, ht, st)
    return o, (ht if n_final else None)


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                               use_qk_l2norm_in_kernel, intra_cp: Optional[IntraCPConfig] = None,
                               variant: Optional[str] = None):
    """Hopper forward on validated inputs (see chunk.py for the arguments). Returns (o, final_state).
    `variant` picks the forward kernel ("fused" or "rs"); None reads $QLA_MEGATRON_HOPPER_FORWARD."""
    variant = forward_variant(variant)
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    dev = k.device
    bounds = tuple(sequence_bounds(B, T, cu_seqlens))
    N = len(bounds) - 1
    lens = [bounds[n + 1] - bounds[n] for n in range(N)]
    cfg = intra_cp if intra_cp is not None else IntraCPConfig.from_env()
    seg_len = plan_segment_len(lens, HV, K, V, _num_sms(dev.index or 0), BV=bv_rs(V) if variant == "rs" else BV,
                               config=cfg)
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

    if variant == "rs":
        Ag, P, F = prepare_rs(qf, kf, gf, bf, plan.chunks, HV, scale, l2)
        run_pass = functools.partial(forward_rs, qf, kf, vf, Ag, P, F)
    else:
        run_pass = _classic_pass(qf, kf, vf, gf, bf, plan, HV, scale, l2)
    if plan.sum_segs is not None:
        NSS = plan.sum_segs.shape[0]
        # Gate-driven summaries: the rs kernel only (the fused one composes exactly).
        gate = dict(gate_chunks=cfg.warmup_chunks) if cfg.mode == "gate" and variant == "rs" else {}
        _, summ = run_pass(plan.sum_segs, n_final=NSS, summary=True, **gate)
        h0 = compose(plan, summ, h0)
    o, ht = run_pass(plan.segs, h0=h0, n_final=N if output_final_state else 0)
    return o.view(B, T, HV, V), ht


def _classic_pass(qf, kf, vf, gf, bf, plan, HV, scale, l2):
    """prepare for the "fused" kernel; returns run_pass(segs, **forward kwargs)."""
    Gc, Bc, Rk, A = prepare(kf, gf, bf, plan.chunks, HV, l2norm=l2)
    return functools.partial(forward, qf, kf, vf, Gc, Bc, Rk, A, scale=scale, l2norm=l2)


def _summary_gate_chunks(gate_chunks: Optional[int]) -> int:
    if gate_chunks is not None:
        return gate_chunks
    cfg = IntraCPConfig()
    return cfg.warmup_chunks if cfg.mode == "gate" else 0


def forward_set(H, HV, K, V, dtype=torch.bfloat16, l2norm=True, variant=DEFAULT_FORWARD,
                gate_chunks: Optional[int] = None):
    """The kernels one (H, HV, K, V, dtype, l2norm) can need: [(factory, args, kwargs)]. Sequence
    length and batch are symbolic, so this set serves every length. Same order for every variant:
    prepare, four main-pass kernels, the summary kernel, the composition without and with h0. rs: the
    summary is gate-driven with warm-ups of gate_chunks chunks (None: the default IntraCPConfig's; 0:
    the exact summary)."""
    d = _DTYPES[dtype]
    compose = [("compose", (HV, K, V), dict(has_initial=hi, BVc=COMPOSE_BVC)) for hi in (False, True)]
    if variant == "rs":
        main = dict(summary=False, BV=bv_rs(V))
        return [("prepare_rs", (H, HV, K, d), dict(l2norm=l2norm, **prepare_heads(H, HV))),
                ("forward_rs", (H, HV, K, V, d), dict(main, has_initial=False, store_final=True)),
                ("forward_rs", (H, HV, K, V, d), dict(main, has_initial=True, store_final=True)),
                ("forward_rs", (H, HV, K, V, d), dict(main, has_initial=True, store_final=False)),
                ("forward_rs", (H, HV, K, V, d), dict(main, has_initial=False, store_final=False)),
                ("forward_rs", (H, HV, K, V, d), dict(summary=True, store_final=True, BV=bv_rs(V),
                                                      gate_chunks=_summary_gate_chunks(gate_chunks)))] + compose
    main = dict(summary=False, BV=BV, async_mma=ASYNC_MMA, l2norm=l2norm)
    return [("prepare", (H, HV, K, d), dict(l2norm=l2norm)),
            ("forward", (H, HV, K, V, d), dict(main, has_initial=False, store_final=True)),
            ("forward", (H, HV, K, V, d), dict(main, has_initial=True, store_final=True)),
            ("forward", (H, HV, K, V, d), dict(main, has_initial=True, store_final=False)),
            ("forward", (H, HV, K, V, d), dict(main, has_initial=False, store_final=False)),
            ("forward", (H, HV, K, V, d), dict(summary=True, store_final=True, BV=BV, async_mma=ASYNC_MMA,
                                               l2norm=l2norm))] + compose


def _compile_one(item):
    name, args, kwargs = item
    factory = {"prepare": prepare_kernel, "forward": forward_kernel, "forward_rs": forward_rs_kernel,
               "prepare_rs": prepare_rs_kernel, "compose": compose_kernel}[name]
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
