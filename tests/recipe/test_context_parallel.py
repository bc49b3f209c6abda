"""Context parallelism end to end: the tiny hybrid on two CP ranks (our GDN layer passing states
between them, SDPA attention on all-gathered keys and values, Megatron's zigzag batch split and
CP rotary positions) logs the losses of the same run on one rank, iteration by iteration."""

from __future__ import annotations

from .runs import losses, run_recipe


def test_cp2_matches_one_rank(mock_run):
    one = losses(mock_run)  # the same flags on one rank (conftest)
    cp2 = losses(run_recipe("--mock-data", "--context-parallel-size", "2", nproc=2))
    assert sorted(one) == sorted(cp2) == list(range(1, 7))
    for i in one:  # the same float32 sums in another order (~1e-6 apart where seen)
        assert abs(float(one[i]) - float(cp2[i])) <= 1e-5, (i, one[i], cp2[i])
