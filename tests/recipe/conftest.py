"""Recipe tests: Megatron's parsed arguments for the tiny config (no global state), and the tiny
hybrid GPT built by the recipe's model provider in a one-rank gloo world."""

from __future__ import annotations

import os

import pytest

from qla_megatron.training.compat import allow_megatron_training_import, enable_megatron_training_on_cpu

allow_megatron_training_import()  # megatron.training imports typing.override (Python 3.12)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "examples", "configs", "tiny_cpu.args")


def recipe_args(*extra: str, config: str = TINY, gpu_memory_gib=None):
    """Megatron's namespace for `config` + `extra` flags, checked as the recipe checks it."""
    enable_megatron_training_on_cpu()
    from qla_megatron.training.launch import parse_recipe_args

    return parse_recipe_args(["--config", config, "--mock-data", *extra], gpu_memory_gib=gpu_memory_gib,
                             set_globals=False)


def build_tiny_model(args):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.arguments import core_transformer_config_from_args

    from qla_megatron.training.model import build_model
    from tests.layers.mcore_setup import init_single_process

    init_single_process()
    return build_model(args, core_transformer_config_from_args(args),
                       pg_collection=ProcessGroupCollection.use_mpu_process_groups())


@pytest.fixture(scope="session")
def mock_run(tmp_path_factory):
    """The log of one uninterrupted one-rank run of runs.SMALL on --mock-data (6 iterations, saves
    every 2, time breakdown on), shared by the tests that compare other runs with it."""
    from .runs import run_recipe

    save = tmp_path_factory.mktemp("mock_run")
    return run_recipe("--mock-data", "--save-interval", "2", "--save", str(save), "--time-breakdown")
