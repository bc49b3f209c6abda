"""Where an iteration's time goes (--time-breakdown): the GDN op, the rest of the GDN layers, the
attention layers' attention, the MLPs, the optimizer step, and the rest of the iteration.

Each timed region is bracketed by identity autograd functions (`_Mark`): in the forward the
entry mark starts a clock and the exit mark stops it; in the backward the exit mark's gradient
runs first (start) and the entry mark's last (stop), so a region's backward, and its forward
recomputed in the backward (activation recompute), are timed too. Clocks are CUDA events on a
GPU (read once per iteration, after a synchronize) and perf_counter on the CPU. Nested regions
(the op inside a GDN layer) are subtracted from the outer one. The marks add two tensor views per
region and a synchronize per iteration, so a run with --time-breakdown is slightly slower.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

REGIONS = ("gdn_op", "gdn_layer", "attention", "mlp")
TIMER = None  # the process's RegionTimer once attach() ran (the GPU path reads it in its log)


class RegionTimer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks = defaultdict(list)  # region -> [clock, clock, ...] (start, stop pairs)

    def mark(self, region: str):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[region].append(event)
        else:
            self.marks[region].append(time.perf_counter())

    def collect(self) -> dict[str, float]:
        """Seconds per region since the last collect (outer regions without their nested ones)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for region, clocks in self.marks.items():
            if len(clocks) % 2:
                raise RuntimeError(f"time breakdown: region {region} has an unpaired mark ({len(clocks)} marks)")
            pairs = zip(clocks[0::2], clocks[1::2])
            if self.cuda:
                out[region] = sum(a.elapsed_time(b) for a, b in pairs) / 1e3
            else:
                out[region] = sum(b - a for a, b in pairs)
        self.marks.clear()
        seconds = {r: out.get(r, 0.0) for r in REGIONS}
        seconds["gdn_layer"] -= seconds["gdn_op"]
        return seconds


class _Mark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, timer, region):
        ctx.timer, ctx.region = timer, region
        timer.mark(region)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.timer.mark(ctx.region)
        return grad, None, None


def _mark(x, timer, region):
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return _Mark.apply(x, timer, region)
    timer.mark(region)  # no backward through this tensor: a forward-only mark (still paired)
    return x


def _mark_output(out, timer, region):
    if isinstance(out, tuple):
        return (_mark(out[0], timer, region), *out[1:])
    return _mark(out, timer, region)


def _time_module(module, timer, region):
    module.register_forward_pre_hook(lambda m, args: (_mark(args[0], timer, region), *args[1:]))
    module.register_forward_hook(lambda m, args, out: _mark_output(out, timer, region))


def _timed(op, timer):
    def timed(q, k, v, g, beta, *args, **kwargs):
        out = op(_mark(q, timer, "gdn_op"), k, v, g, beta, *args, **kwargs)
        if isinstance(out, tuple):
            return (_mark(out[0], timer, "gdn_op"), *out[1:])
        return _mark(out, timer, "gdn_op")

    timed._qla_timed = True
    timed._qla_original = op
    return timed


def detach_ops() -> None:
    """Undo the op wrapping of our layer's module (tests; a run keeps it to the end)."""
    import qla_megatron.layers.gated_delta_net as module

    for name in ("chunk_gated_delta_rule", "cp_chunk_gated_delta_rule"):
        op = getattr(module, name)
        setattr(module, name, getattr(op, "_qla_original", op))


def _time_gdn_op(layer, timer):
    """Wrap the op this GDN layer calls: megatron-core's layer holds it as `gated_delta_rule`
    (FLA's function); ours calls its module's chunk_gated_delta_rule / cp_chunk_gated_delta_rule."""
    import sys

    if hasattr(layer, "gated_delta_rule"):
        layer.gated_delta_rule = _timed(layer.gated_delta_rule, timer)
        return
    module = sys.modules[type(layer).__module__]
    for name in ("chunk_gated_delta_rule", "cp_chunk_gated_delta_rule"):
        op = getattr(module, name)
        if not getattr(op, "_qla_timed", False):
            setattr(module, name, _timed(op, timer))


def attach(model, timer: RegionTimer) -> None:
    """Bracket the regions of a GPTModel of our hybrid block (ours or megatron-core's GDN layer)."""
    global TIMER
    TIMER = timer
    for layer in model.decoder.layers:
        attn = layer.self_attention
        gdn = hasattr(attn, "A_log")
        _time_module(attn, timer, "gdn_layer" if gdn else "attention")
        if gdn:
            _time_gdn_op(attn, timer)
        _time_module(layer.mlp, timer, "mlp")


def format_breakdown(seconds: dict[str, float], optimizer_s: float, iteration_s: float) -> str:
    """One line: each part's time per iteration and its share; other = the iteration's rest."""
    parts = dict(seconds, optimizer=optimizer_s)
    parts["other"] = iteration_s - sum(parts.values())
    names = {"gdn_op": "GDN op", "gdn_layer": "rest of GDN layers", "attention": "attention layers' attention",
             "mlp": "MLP", "optimizer": "optimizer", "other": "other"}
    return "time: " + ", ".join(f"{names[k]} {v * 1e3:.0f} ms ({100 * v / iteration_s:.0f}%)" for k, v in parts.items())
