"""The GPU path's log (megatron_loop._wrap_training_log) on the CPU: Megatron's training_log is
called as before, and after it our line for every logged iteration, with the loss Megatron got,
the time between logged iterations, and (--time-breakdown) the optimizer time from Megatron's
level-1 timer, read before Megatron's own log resets it."""

from __future__ import annotations

import time

import pytest
import torch

from .conftest import TINY


@pytest.fixture
def megatron_globals():
    from qla_megatron.training.compat import enable_megatron_training_on_cpu

    enable_megatron_training_on_cpu()
    from megatron.training.global_vars import unset_global_variables

    from qla_megatron.training.launch import parse_recipe_args
    from tests.layers.mcore_setup import init_single_process

    init_single_process()  # a one-rank gloo world: the wrapper asks for ranks
    args = parse_recipe_args(["--config", TINY, "--mock-data", "--time-breakdown", "--log-interval", "2"])
    yield args
    unset_global_variables()


def test_wrapped_training_log(megatron_globals, monkeypatch):
    import megatron.training.training as mt

    from qla_megatron.training import breakdown, megatron_loop

    calls, printed = [], []
    monkeypatch.setattr(mt, "training_log", lambda *a, **kw: calls.append(a[3]) or "flag")
    monkeypatch.setattr(breakdown, "TIMER", breakdown.RegionTimer("cpu"))
    megatron_loop._wrap_training_log(lambda line, **kw: printed.append(line))
    timer = mt.get_timers()("optimizer", log_level=1)
    for iteration in range(1, 6):
        timer.start()
        time.sleep(0.01)
        timer.stop()
        out = mt.training_log({"lm loss": torch.tensor(5.0 - iteration)}, {}, 1e-3, iteration, 1.0, True,
                              0, 1.0, None, 0, 0, pg_collection=None, is_first_iteration=iteration == 1)
        assert out == "flag"
    assert calls == [1, 2, 3, 4, 5]
    lines = [p for p in printed if p.startswith("iter ")]
    assert [ln.split("|")[0].strip() for ln in lines] == ["iter 2/60", "iter 4/60"]
    assert "loss 3.000000" in lines[0] and "loss 1.000000" in lines[1]
    times = [p for p in printed if p.startswith("time: ")]
    assert len(times) == 2 and all("optimizer" in t for t in times)
    assert printed[0].startswith("recipe: 4 layers")
