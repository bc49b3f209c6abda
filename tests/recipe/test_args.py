"""Bad arguments are refused before any work, with the argument and the limit named."""

from __future__ import annotations

import os

import pytest

from .conftest import ROOT, recipe_args

CONFIGS = os.path.join(ROOT, "examples", "configs")


@pytest.mark.parametrize("extra,match", [
    pytest.param(("--tensor-model-parallel-size", "8"), r"--num-attention-heads \(4\) must be divisible by "
                 r"--tensor-model-parallel-size \(8\)", id="attention-heads-TP"),
    pytest.param(("--linear-num-key-heads", "3", "--linear-num-value-heads", "6", "--tensor-model-parallel-size", "2"),
                 r"--linear-num-key-heads \(3\) must be divisible by --tensor-model-parallel-size \(2\)", id="gdn-heads-TP"),
    pytest.param(("--linear-num-value-heads", "3"), r"--linear-num-value-heads \(3\) must be a multiple of "
                 r"--linear-num-key-heads \(2\)", id="grouped-heads"),
    pytest.param(("--context-parallel-size", "2", "--seq-length", "250", "--max-position-embeddings", "250"),
                 r"--seq-length \(250\) must be divisible by 4 \(= 2 x --context-parallel-size 2", id="seq-CP-zigzag"),
    pytest.param(("--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "255",
                  "--max-position-embeddings", "255"), r"--seq-length / CP must be divisible by TP", id="seq-SP"),
    pytest.param(("--lr-warmup-iters", "60"), r"--lr-warmup-iters \(60\) must be below", id="warmup"),
    pytest.param(("--save", "/nonexistent/ckpt", "--save-interval", "0"), r"--save .* needs --save-interval", id="save-interval"),
])
def test_bad_arguments(extra, match):
    with pytest.raises(ValueError, match=match):
        recipe_args(*extra)


def test_missing_data_path(tmp_path):
    from qla_megatron.training.compat import enable_megatron_training_on_cpu
    from qla_megatron.training.launch import parse_recipe_args

    enable_megatron_training_on_cpu()
    tiny = os.path.join(CONFIGS, "tiny_cpu.args")
    with pytest.raises(ValueError, match=r"--data-path is required \(or --mock-data\)"):
        parse_recipe_args(["--config", tiny], set_globals=False)
    prefix = str(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match=r"--data-path .*nothing_here.*: missing .*nothing_here\.bin"):
        parse_recipe_args(["--config", tiny, "--data-path", prefix], set_globals=False)


def test_config_that_cannot_fit():
    # ~27B parameters on one GPU: weights, gradients and Adam state alone exceed an H200.
    with pytest.raises(ValueError, match=r"needs at least .* GiB per GPU .* more than --gpu-memory-gib 139"):
        recipe_args("--seq-length", "32768", "--max-position-embeddings", "32768", "--micro-batch-size", "1",
                    "--global-batch-size", "1", config=os.path.join(CONFIGS, "qwen35_27b.args"), gpu_memory_gib=139)


def test_config_file_is_overridden_by_the_command_line():
    args = recipe_args("--hidden-size", "64", "--ffn-hidden-size", "192")
    assert args.hidden_size == 64 and args.ffn_hidden_size == 192 and args.num_layers == 4


def test_context_parallel_with_megatron_local_attention_is_refused():
    from qla_megatron.layers.specs import have_transformer_engine

    if have_transformer_engine():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError, match=r"--context-parallel-size 2 with --core-attention megatron needs "
                                         r"Transformer Engine's attention"):
        recipe_args("--context-parallel-size", "2", "--core-attention", "megatron")


def test_megatron_gdn_needs_fla():
    try:
        import fla  # noqa: F401
        pytest.skip("fla is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"--gdn-impl megatron needs fla-core"):
        recipe_args("--gdn-impl", "megatron")


def test_intra_cp_flags_reach_our_layers():
    from qla_megatron.layers import GatedDeltaNet

    from .conftest import build_tiny_model

    model = build_tiny_model(recipe_args("--intra-cp", "off", "--intra-cp-segment", "128", "--intra-cp-mode",
                                         "exact", "--gdn-check-finite"))
    gdn = [layer.self_attention for layer in model.decoder.layers if isinstance(layer.self_attention, GatedDeltaNet)]
    assert len(gdn) == 3
    for layer in gdn:
        opts = layer.options
        assert (opts.intra_cp.enabled, opts.intra_cp.segment_len, opts.intra_cp.mode, opts.check_finite) == \
            (False, 128, "exact", True)
    with pytest.raises(ValueError, match=r"--intra-cp-segment / --intra-cp-mode: .*multiple of 64"):
        recipe_args("--intra-cp-segment", "100")
