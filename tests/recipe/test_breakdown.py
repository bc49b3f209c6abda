"""The time breakdown's marks: every region is timed in forward and backward (paired marks), and
marking changes neither the loss nor any gradient."""

from __future__ import annotations

import torch

from qla_megatron.training.breakdown import REGIONS, RegionTimer, attach, detach_ops

from .conftest import build_tiny_model, recipe_args


def _loss_and_grads(model, tokens):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    model.zero_grad()
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_marks_time_every_region_and_change_nothing():
    args = recipe_args("--seq-length", "96", "--max-position-embeddings", "96")
    model = build_tiny_model(args)
    tokens = torch.randint(0, 257, (2, 96))
    loss_ref, grads_ref = _loss_and_grads(model, tokens)
    timer = RegionTimer("cpu")
    attach(model, timer)
    try:
        loss, grads = _loss_and_grads(model, tokens)
    finally:
        detach_ops()
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))
    # 3 GDN layers x (forward, backward) of the op and of the layer, 1 attention layer, 4 MLPs.
    counts = {region: len(marks) for region, marks in timer.marks.items()}
    assert counts == {"gdn_op": 12, "gdn_layer": 12, "attention": 4, "mlp": 16}
    seconds = timer.collect()
    assert set(seconds) == set(REGIONS) and all(v > 0 for v in seconds.values()), seconds
