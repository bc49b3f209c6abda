"""The intra-card CP planner's cost model (intra_cp.py): whole waves, and the segment counts it picks
where they were measured on an H200 (132 SMs; benchmarks/results/segment_len_h200.md)."""

import pytest

from qla_megatron.ops.gated_delta_rule.intra_cp import IntraCPConfig, _pass_time, _programs, plan_segment_len

H200_SMS = 132


def segments(T, HV, cfg=None):
    seg = plan_segment_len([T], HV, 128, 128, H200_SMS, BV=128, config=cfg or IntraCPConfig())
    return 1 if seg is None else -(-T // seg)


def test_waves_are_whole():
    assert _pass_time({128: 192}, 132) == 256            # two waves, not 192 * 128 / 132
    assert _pass_time({128: 132}, 132) == 128
    assert _pass_time({128: 133}, 132) == 256
    # short programs fill the idle slots of the last wave first: 60 busy slots, 72 free ones
    assert _pass_time({128: 192, 100: 72}, 132) == 256
    assert _pass_time({128: 192, 100: 73}, 132) == 328    # the 73rd goes after a short one: 128 + 100 + 100
    assert _pass_time({}, 132) == 0


def test_programs_of_a_cut():
    # 512 chunks in segments of 103: four full and one of 100, 32 programs each
    assert _programs([512], 103, 32) == {103: 128, 100: 32}
    # gate mode's summary walks: only the warm-up of every segment with a successor
    assert _programs([412], 103, 64, walk=lambda L: min(L, 4)) == {4: 256}
    assert _programs([64, 1], 64, 2) == {64: 2, 1: 2}


@pytest.mark.parametrize("HV,T,want", [
    (48, 32768, 5),     # measured: 5 segments 6.830 ms fwd+bwd, 4 (the planner without waves) 7.394
    (32, 32768, 4),     # measured best, 4.507 ms (5: 5.523, 8: 4.715)
    (8, 32768, 16),     # measured best fwd+bwd, 1.455 ms (12: 1.491, 8: 1.655)
])
def test_picks_the_measured_best(HV, T, want):
    assert segments(T, HV) == want


def test_exact_mode_costs_whole_summaries():
    # exact summaries walk whole segments: never more segments than gate mode's warm-ups allow
    for HV in (8, 32, 48, 64):
        assert segments(32768, HV, IntraCPConfig(mode="exact")) <= segments(32768, HV)


@pytest.mark.parametrize("field", ["summary_cost", "compose_cost", "backward_walk_cost"])
def test_costs_are_checked(field):
    with pytest.raises(ValueError, match=field):
        IntraCPConfig(**{field: -1.0})
    with pytest.raises(ValueError, match=field):
        IntraCPConfig(**{field: "2"})
