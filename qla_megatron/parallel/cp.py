"""Cross-GPU context parallelism for the gated delta rule, by passing segment states between ranks.

Each rank holds pieces of the sequences (cp_plan.py: one a row "contiguous", two "zigzag", Megatron's
layout; packed sequences cut at the shard or sequence boundaries). The same mechanism as intra-card
context parallelism (ops.segmented_chunk_gated_delta_rule, hopper/), with ranks in place of segments,
and the same composition (ops.gated_delta_rule.segments.compose):

    forward   every rank summarises its pieces that continue onto a later piece, S_end = M S_start +
              S_ext (ops.segment_summary; fp32, HV K (K + V) a piece: independent of the sequence
              length), one all-gather, the composition of every start state in sequence order, then
              its own pieces from their starts (one call of the op, any backend)
    backward  the dual, nothing differentiated through the composition: every rank sends
              [M^T | dS_ext] of its pieces that continue an earlier piece (dS_ext: the adjoint of the
              piece's start from its own outputs, a backward from a zero end adjoint), one
              all-gather, the composition right to left of every piece's end adjoint, then its own
              backward from the starts with those end adjoints (the op's own backward: the Hopper
              kernels, with their intra-card CP, under backend "tilelang")

Under backend "tilelang" (the Hopper kernels) each rank prepares its local stream once
(ops hopper/pieces.py: one host plan of its pieces, cut into segments as intra-card CP cuts a
sequence, and one set of chunk factors), takes its pieces' [M | S_ext] from those factors, runs the
rest of the forward from the composed starts (with intra-card CP inside each piece), and in the
backward takes [M^T | dS_ext] and the op's backward from the same saved factors; the compositions
run on the compose kernel. Otherwise the summaries and compositions are the torch references, where
dS_ext costs one more backward of the continuing pieces, and the local forward runs under autograd
with its graph kept for the backward (what the op saves for its own backward; nothing is recomputed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qla_megatron.ops import chunk_gated_delta_rule, segment_summary
from qla_megatron.ops.gated_delta_rule import backends
from qla_megatron.ops.gated_delta_rule.inputs import check_cu_seqlens, check_inputs, compute_dtype
from qla_megatron.ops.gated_delta_rule.options import resolve_options
from qla_megatron.ops.gated_delta_rule.segments import compose

from .collectives import all_gather_stacked
from .cp_plan import CPPlan, cp_plan
from .layouts import check_layout


def cp_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, cp_group=None, layout="contiguous",
                              cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend="auto", *, options=None,
                              initial_state=None):
    """Gated delta rule over a sequence split across the ranks of `cp_group`.

    Args:
        q, k [B, T_local, H, K]; v [B, T_local, HV, V]; g, beta [B, T_local, HV]: this rank's shard,
            laid out as `layout` says (qla_megatron.parallel.layouts; every rank holds T_local tokens).
        cp_group: the context-parallel process group (default: the whole world).
        layout: "contiguous" or "zigzag".
        cu_seqlens: int64 [N + 1] offsets of packed sequences in the *global* stream of cp * T_local
            tokens (B must be 1), the same on every rank. "contiguous": the global stream is cut into
            cp equal shards; a sequence that crosses a rank boundary carries its state across it.
            "zigzag" (Megatron's THD layout with CP): every sequence, its length a multiple of 2 cp,
            is cut into 2 cp equal segments and rank r holds segments r and 2 cp - 1 - r of each,
            sequence after sequence.
        scale, use_qk_l2norm_in_kernel, backend: as in chunk_gated_delta_rule (backend of the local
            runs, forward and backward, and of the summaries and compositions: the Hopper passes
            under "tilelang", else the torch references).
        options: GDNOptions of the local runs, as in chunk_gated_delta_rule (None: the defaults). Its
            debug switch check_finite also checks that every rank's shard has the same shape and
            cu_seqlens is the same on every rank (collectives and host reads: off by default).
        initial_state: not supported yet (it would be the first segment's start state): must be None.

    Returns:
        o [B, T_local, HV, V], this rank's output, equal to the matching slice of the single-GPU result.
        Differentiable in q, k, v, g, beta; its backward is collective (every rank of cp_group must
        run it, as every rank ran the forward).
    """
    check_layout(layout)
    if initial_state is not None:
        raise ValueError("initial_state is not supported by cp_chunk_gated_delta_rule yet (every sequence "
                         "starts from zero); pass initial_state=None")
    if cp_group is not None and not isinstance(cp_group, dist.ProcessGroup):
        raise ValueError(f"cp_group must be a torch.distributed ProcessGroup or None (the default group), "
                         f"got {type(cp_group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("cp_chunk_gated_delta_rule needs an initialized torch.distributed process group "
                         "(cp_group, or the default one)")
    options = resolve_options(options)
    check_inputs(q, k, v, g, beta, scale, check_finite=options.check_finite)
    cp = dist.get_world_size(cp_group)
    rank = dist.get_rank(cp_group)
    if options.check_finite:
        _check_same_shapes(q, v, cp_group)
        if cu_seqlens is not None:
            _check_same_on_ranks(cu_seqlens, cp_group)
    B, T = k.shape[:2]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, cp * T)
    plan = cp_plan(layout, cp, T, B, tuple(cu_seqlens.tolist()) if cu_seqlens is not None else None)
    run = dict(scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, backend=backend, options=options)
    run["kernels"] = on_kernels((q, k, v), run)
    run["grad"] = torch.is_grad_enabled()      # inside the Function's forward it is always off
    return _StatePassing.apply(q, k, v, g, beta, plan, rank, cp_group, run)


def _check_same_shapes(q, v, group):
    """Debug check: every rank holds a shard of one shape (B, T_local, H, HV, K, V), else ValueError
    naming the shards (an all-gather and a host read)."""
    mine = torch.tensor(list(q.shape) + list(v.shape[2:]), dtype=torch.int64, device=q.device)
    shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, mine, group=group)
    got = [tuple(int(x) for x in t) for t in shapes]
    if len(set(got)) != 1:
        raise ValueError("the shards of q, k, v, g, beta must have one shape on every rank "
                         f"(B, T_local, H, K, HV, V); got {got} by rank")


def _check_same_on_ranks(cu_seqlens, group):
    """Debug check: cu_seqlens is the same on every rank (else ValueError naming it). Two all-gathers
    (its length, then its values) and a host read."""
    cu = cu_seqlens.to(torch.int64).reshape(-1)
    cp = dist.get_world_size(group)
    n = torch.tensor([cu.numel()], dtype=torch.int64, device=cu.device)
    sizes = [torch.empty_like(n) for _ in range(cp)]
    dist.all_gather(sizes, n, group=group)
    if len({int(t) for t in sizes}) != 1:
        raise ValueError(f"cu_seqlens must be the same on every rank; their lengths differ: {[int(t) for t in sizes]}")
    values = [torch.empty_like(cu) for _ in range(cp)]
    dist.all_gather(values, cu.contiguous(), group=group)
    if any(not torch.equal(vals, values[0]) for vals in values):
        raise ValueError(f"cu_seqlens must be the same on every rank; got {[vals.tolist() for vals in values]}")


def _pieces(x, bounds, idx):
    """The tokens of local pieces idx (of the local stream x [1, T, ...] cut at bounds), packed; their
    offsets there are _sub_bounds(bounds, idx)."""
    return torch.cat([x[:, bounds[p]:bounds[p + 1]] for p in idx], dim=1)


def _rows(rows, src, n, like):
    """[n, ...] zeros with row p = src[rows[p]] where rows[p] >= 0 (index tensors built on the host)."""
    out = like.new_zeros((n,) + tuple(src.shape[1:]))
    take = [p for p in range(n) if rows[p] >= 0]
    if take:
        dev = like.device
        out[torch.tensor(take, device=dev)] = src[torch.tensor([rows[p] for p in take], device=dev)]
    return out


def _take(summ, idx):
    """Rows idx (host ints) of summ, in that order."""
    return summ[torch.tensor(idx, dtype=torch.int64, device=summ.device)]


def _gather(x, n_slots, group):
    """Every rank's x [len(slots), ...] padded to n_slots rows, all-gathered rank-major: [cp n_slots, ...]."""
    pad = x.new_zeros((n_slots - x.shape[0],) + tuple(x.shape[1:]))
    return all_gather_stacked(torch.cat([x, pad]), group).flatten(0, 1)


def forward_summaries(flat, plan: CPPlan, rank: int, run: dict):
    """Rank `rank`'s summaries: (fs [len(fsend), HV, K, K + V], the [M | S_ext] it sends forward;
    Mb [len(bsend), HV, K, K] or None, the M of the pieces it sends backward, for M^T), from its
    packed local stream flat = [q, k, v, g, beta] ([1, T, ...] each), in one scan. run["kernels"]
    (on_kernels, decided once a call): the Hopper summary pass, else the torch reference."""
    k, v = flat[1], flat[2]
    HV, K, V = v.shape[2], k.shape[-1], v.shape[-1]
    bounds = plan.bounds[rank]
    if run["kernels"]:     # the local stream prepared once; [M | S_ext] of its pieces from those factors
        from qla_megatron.ops.gated_delta_rule.hopper import pieces
        local = pieces.prepare_local(*flat, bounds, run["scale"], run["use_qk_l2norm_in_kernel"],
                                     run["options"].intra_cp)
        fs = plan.fsend[rank]
        if not fs:
            return k.new_zeros(0, HV, K, K + V, dtype=torch.float32), local
        return _take(pieces.piece_summaries(local), fs), local
    send = sorted(set(plan.fsend[rank]) | set(plan.bsend[rank]))
    if not send:
        return k.new_zeros(0, HV, K, K + V, dtype=compute_dtype(k.dtype)), None
    ks, vs, gs, bs = (_pieces(x, bounds, send) for x in flat[1:])
    ext, M = segment_summary(ks, vs, gs, bs, _offsets(_sub_bounds(bounds, send), k.device),
                             use_qk_l2norm_in_kernel=run["use_qk_l2norm_in_kernel"])
    at = {p: i for i, p in enumerate(send)}
    fs = torch.cat([M, ext], dim=-1)[[at[p] for p in plan.fsend[rank]]]
    Mb = M[[at[p] for p in plan.bsend[rank]]] if plan.bsend[rank] else None
    return fs, Mb


def forward_run(flat, plan: CPPlan, rank: int, Z, run: dict, keep_graph: bool = False, local=None):
    """The rank's pieces from their start states (rows of Z = compose(plan.fwalk, ...), or None when
    no sequence crosses a rank): (o [1, T, HV, V], h0 [P, HV, K, V], graph). keep_graph: what the
    backward runs from is kept as graph (else None): on the kernels (local: forward_summaries'
    prepared stream) ("kernels", local, the op's ForwardSaved); otherwise the op runs under autograd
    with its final states out and graph = (leaves, o, final states), which backward_run
    differentiates (the op's own saved state: no recompute)."""
    k, v = flat[1], flat[2]
    HV, K, V = v.shape[2], k.shape[-1], v.shape[-1]
    bounds = plan.bounds[rank]
    P = len(bounds) - 1
    # Start states in the composition's dtype (fp32 from the compose kernel; the torch path's compute dtype).
    dt = Z.dtype if Z is not None else (torch.float32 if run["kernels"] else compute_dtype(k.dtype))
    like = k.new_zeros(1, HV, K, V, dtype=dt)
    h0 = _rows(plan.start_row[rank], Z, P, like) if Z is not None else like.new_zeros(P, HV, K, V)
    if run["kernels"]:
        from qla_megatron.ops.gated_delta_rule.hopper import pieces
        o, saved = pieces.run_local(local, h0, keep_graph)
        return o, h0, (("kernels", local, saved) if keep_graph else None)
    cu = _offsets(bounds, k.device)
    if not keep_graph:
        return _local(flat, h0, cu, run)[0], h0, None
    leaves = [t.detach().requires_grad_(True) for t in flat]
    with torch.enable_grad():
        o, fin = _local(leaves, h0, cu, run, final=True)
    return o.detach(), h0, (leaves, o, fin)


def backward_summaries(flat, dof, plan: CPPlan, rank: int, h0, Mb, run: dict, graph=None):
    """[M^T | dS_ext] [len(bsend), HV, K, K + V] of the rank's pieces that continue an earlier one:
    dS_ext the start adjoint of the piece's own outputs (linear in its start: the op's gradient at a
    zero start). On the kernels from forward_run's graph (the factors it saved); else Mb (the M
    forward_summaries returned) and a backward of the continuing pieces."""
    HV, K, V = h0.shape[1:]
    bounds, bs = plan.bounds[rank], plan.bsend[rank]
    if not bs:
        return h0.new_zeros(0, HV, K, K + V)
    if run["kernels"]:                 # the Hopper backward summary pass from the forward's factors
        from qla_megatron.ops.gated_delta_rule.hopper import pieces
        _, local, saved = graph
        return _take(pieces.piece_backward_summaries(local, saved, dof), bs)
    sub = [_pieces(x, bounds, bs) for x in flat]
    z = h0.new_zeros(len(bs), HV, K, V).requires_grad_(True)
    with torch.enable_grad():
        o_sub, _ = _local(sub, z, _offsets(_sub_bounds(bounds, bs), h0.device), run)
        dext, = torch.autograd.grad(o_sub, z, _pieces(dof, bounds, bs).to(o_sub.dtype))
    return torch.cat([Mb.transpose(-1, -2), dext.to(Mb.dtype)], dim=-1)


def backward_run(dof, plan: CPPlan, rank: int, h0, D, graph):
    """The op's backward of the rank's pieces, from forward_run's kept graph and their end adjoints
    (rows of D = compose(plan.bwalk, ...), or None): the gradients of q, k, v, g, beta in the shapes
    of its local stream."""
    P = len(plan.bounds[rank]) - 1
    dht = _rows(plan.end_row[rank], D, P, h0[:1]) if D is not None else torch.zeros_like(h0)
    if graph[0] == "kernels":
        from qla_megatron.ops.gated_delta_rule.hopper import pieces
        return pieces.backward_local(graph[1], graph[2], dof, dht)
    leaves, o, fin = graph
    return torch.autograd.grad((o, fin), leaves, (dof.to(o.dtype), dht.to(fin.dtype)))


def compose_walk(walk, gathered, rows: int, kernels: bool = False):
    """segments.compose along one of the plan's walks from zero (None where the walk is empty); on
    the Hopper compose kernel where the summaries came from the Hopper passes."""
    return compose(walk, gathered, None, rows, backend="tilelang" if kernels else "torch") if rows else None


def on_kernels(qkv, run: dict) -> bool:
    """Whether the call's backend is the Hopper one (backends.select for these q, k, v, as the op
    selects): then the summaries and the compositions run on its kernels too."""
    q, k, v = qkv
    info = backends.CallInfo(k.device, q.dtype, k.shape[2], v.shape[2], k.shape[3], v.shape[3], varlen=True,
                             requires_grad=True)
    return backends.select(run["backend"], info).name == "tilelang"


def _sub_bounds(bounds, idx) -> tuple:
    """Offsets of pieces idx packed one after another (host ints)."""
    out = [0]
    for p in idx:
        out.append(out[-1] + bounds[p + 1] - bounds[p])
    return tuple(out)


class _StatePassing(torch.autograd.Function):
    """cp_chunk_gated_delta_rule's forward and its dual backward (the module docstring) on one
    CPPlan, a rank's inputs [B, T, ...] run as one packed stream of its pieces."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, plan: CPPlan, rank, group, run):
        B, T = k.shape[:2]
        flat = [x.reshape((1, B * T) + tuple(x.shape[2:])) for x in (q, k, v, g, beta)]
        fs, extra = forward_summaries(flat, plan, rank, run)      # extra: M (torch) or the prepared stream
        Z = compose_walk(plan.fwalk, _gather(fs, plan.Q, group), plan.NF, run["kernels"])
        # The op's graph only where a backward will follow (not under no_grad / for frozen inputs).
        keep = run["grad"] and any(ctx.needs_input_grad[:5])
        o, h0, ctx.graph = forward_run(flat, plan, rank, Z, run, keep_graph=keep,
                                       local=extra if run["kernels"] else None)
        Mb = None if run["kernels"] else extra
        ctx.save_for_backward(q, k, v, g, beta, h0, Mb)
        ctx.plan, ctx.rank, ctx.group, ctx.run = plan, rank, group, run
        return o.view(B, T, v.shape[2], v.shape[3])

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, beta, h0, Mb = ctx.saved_tensors
        plan, rank, run = ctx.plan, ctx.rank, ctx.run
        B, T = k.shape[:2]
        flat = [x.detach().reshape((1, B * T) + tuple(x.shape[2:])) for x in (q, k, v, g, beta)]
        dof = do.reshape((1, B * T) + tuple(do.shape[2:]))
        bsumm = backward_summaries(flat, dof, plan, rank, h0, Mb, run, ctx.graph)
        D = compose_walk(plan.bwalk, _gather(bsumm, plan.QB, ctx.group), plan.NB, run["kernels"])
        grads = backward_run(dof, plan, rank, h0, D, ctx.graph)
        ctx.graph = None
        return tuple(gr.reshape(x.shape) for gr, x in zip(grads, (q, k, v, g, beta))) + (None,) * 4


def _offsets(bounds, device):
    return torch.tensor(bounds, dtype=torch.int64, device=device)


def _local(flat, h0, cu, run, final=False):
    """The op on a rank's packed pieces from their start states h0 [P, HV, K, V]."""
    return chunk_gated_delta_rule(*flat, scale=run["scale"], initial_state=h0, output_final_state=final,
                                  cu_seqlens=cu, use_qk_l2norm_in_kernel=run["use_qk_l2norm_in_kernel"],
                                  backend=run["backend"], options=run["options"])
