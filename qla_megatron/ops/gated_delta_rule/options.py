"""The options of the gated delta rule that are not tensors, in one frozen object passed by argument.

    GDNOptions(intra_cp=IntraCPConfig(...), check_finite=False)

`chunk_gated_delta_rule(..., options=)` hands it to the backend ("tilelang" reads `intra_cp`;
"torch" and "fla" have no intra-card CP and ignore it), and the layer (qla_megatron.layers) takes it
from its spec and passes it on. `options=None` means `default_options()`.

The environment variables below are read here and nowhere else, once per process, on the first
call of `default_options()` (a launcher may set them before it builds the model; later changes are
not seen). An explicit GDNOptions wins over all of them.

    QLA_MEGATRON_CHECK_FINITE=1             scan every input for NaN/Inf (default 0: off)
    QLA_MEGATRON_INTRA_CP=0                 no intra-card context parallelism (default 1: on)
    QLA_MEGATRON_INTRA_CP_SEGMENT=<tokens>  force the segment length (a multiple of 64)
    QLA_MEGATRON_INTRA_CP_MODE=exact|gate   summaries exact or gate-driven (default gate)
    QLA_MEGATRON_INTRA_CP_WARMUP=<chunks>   gate mode: warm-up chunks before a segment (default 4)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Mapping

from .intra_cp import IntraCPConfig

ENV_VARS = ("QLA_MEGATRON_CHECK_FINITE", "QLA_MEGATRON_INTRA_CP", "QLA_MEGATRON_INTRA_CP_SEGMENT",
            "QLA_MEGATRON_INTRA_CP_MODE", "QLA_MEGATRON_INTRA_CP_WARMUP")


@dataclass(frozen=True)
class GDNOptions:
    """Options of one call of the gated delta rule (or of every call a layer makes).

    intra_cp: intra-card context parallelism of the Hopper kernels (intra_cp.IntraCPConfig: on/off,
        segment length, "exact" or "gate" summaries, warm-up chunks). Ignored by "torch" and "fla".
    check_finite: scan q, k, v, g, beta and initial_state for NaN/Inf and raise ValueError naming
        the input. A debug check: it reads every input once more and waits for the device (a host
        sync, which also rules out CUDA-graph capture). Off, a non-finite input makes every later
        output of its sequence NaN.
    """
    intra_cp: IntraCPConfig = field(default_factory=IntraCPConfig)
    check_finite: bool = False

    def __post_init__(self):
        if not isinstance(self.intra_cp, IntraCPConfig):
            raise ValueError(f"GDNOptions.intra_cp must be an IntraCPConfig, got {type(self.intra_cp).__name__}")
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"GDNOptions.check_finite must be a bool, got {self.check_finite!r}")


def options_from_env(environ: Mapping[str, str]) -> GDNOptions:
    """GDNOptions from the QLA_MEGATRON_* variables of `environ` (module docstring); unset or empty
    variables keep the dataclass defaults. A malformed value raises ValueError naming the variable."""
    def flag(name: str, default: bool) -> bool:
        value = environ.get(name, "")
        if value == "":
            return default
        if value not in ("0", "1"):
            raise ValueError(f"{name} must be 0 or 1, got {value!r}")
        return value == "1"

    def count(name: str):
        value = environ.get(name, "")
        if value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None

    defaults = IntraCPConfig()
    warmup = count("QLA_MEGATRON_INTRA_CP_WARMUP")
    try:
        intra_cp = IntraCPConfig(enabled=flag("QLA_MEGATRON_INTRA_CP", defaults.enabled),
                                 segment_len=count("QLA_MEGATRON_INTRA_CP_SEGMENT"),
                                 mode=environ.get("QLA_MEGATRON_INTRA_CP_MODE", "") or defaults.mode,
                                 warmup_chunks=defaults.warmup_chunks if warmup is None else warmup)
    except ValueError as e:
        raise ValueError(f"QLA_MEGATRON_INTRA_CP_*: {e}") from None
    return GDNOptions(intra_cp=intra_cp, check_finite=flag("QLA_MEGATRON_CHECK_FINITE", False))


@functools.lru_cache(maxsize=1)
def default_options() -> GDNOptions:
    """The options of calls that pass none: the process environment, read on the first call only."""
    return options_from_env(os.environ)


def resolve_options(options) -> GDNOptions:
    """`options`, or default_options() for None; anything else raises ValueError."""
    if options is None:
        return default_options()
    if not isinstance(options, GDNOptions):
        raise ValueError(f"options must be a qla_megatron.ops.GDNOptions or None, got {type(options).__name__}")
    return options
