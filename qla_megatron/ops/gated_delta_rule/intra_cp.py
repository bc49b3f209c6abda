"""Intra-card context parallelism: how many segments to cut each sequence into (DESIGN §2).

The forward kernel runs one program per (value block, v-head, segment) and walks its segment's chunks
one after another, so a pass takes about

    chunks per program x waves,   waves = ceil(programs / concurrent programs)   (in chunk-steps)

counted in whole waves (programs placed longest first on the least-loaded SM): 192 programs on 132
SMs take two segment-times, not 1.45. Measured on an H200 at 48/16 heads x 32k tokens
(benchmarks/bench_segment_len.py): 4 segments (192 programs, two waves) 1.530 / 7.394 ms forward /
forward+backward, 5 segments (240 programs, two full waves) 1.384 / 6.830; the planner without
waves chose 4.

With segments, a summary pass (state widened to K + V columns, no output; its programs cost about
`summary_cost` of a main program per chunk; in gate mode a warm-up walk of `warmup_chunks` chunks,
the decaying heads' cost, which a plan that reads no gates assumes) runs first, then one composition
step per segment boundary (sequential, `compose_cost` each), then the main pass from composed starts.
The estimate is that of a training step: the backward walks the chunks again (the states pass and
the adjoint walk, `backward_walk_cost` forward walks) and has its own summaries and composition.
The planner compares the estimate of every candidate segment length (the longest sequence cut into
1, 2, 3, ... equal segments, down to `min_segment_chunks` chunks: any count, so that waves can be
filled) and picks the fastest; a candidate must beat the best so far by 5 %, so ties go to fewer
segments.

Options (IntraCPConfig, carried by options.GDNOptions.intra_cp): `enabled=False` turns it off;
`segment_len=<tokens>` forces a segment length (a multiple of 64). `mode="gate"` (the default)
starts a (segment, v-head) from a warm-up over the `warmup_chunks` chunks before it (default
segment_plan.WARMUP_CHUNKS = 4) instead of the exact composition where the decay over that window is below e^-10: that pair's
summary walks only the window (DESIGN §2, "gate-driven"; the bound is in
segments.segmented_chunk_gated_delta_rule); heads without such decay compose exactly. "exact"
always composes. The QLA_MEGATRON_INTRA_CP* environment variables give the defaults (options.py).

Packed sequences (cu_seqlens) are planned from shapes only (packed_segment_len), so that the
lengths are never read on the host: the segment length is the one planned for the longest
sequence the shapes allow (T - N + 1 tokens, the other N - 1 one token each). Only sequences longer
than it are cut; the Hopper path builds the plan on the device (segment_plan.packed_tables).
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

from .segment_plan import CHUNK, WARMUP_CHUNKS


@dataclass(frozen=True)
class IntraCPConfig:
    enabled: bool = True
    segment_len: Optional[int] = None       # tokens; forces the segment length when set
    min_segment_chunks: int = 8              # shorter segments cost more in summaries than they save
    programs_per_sm: int = 1                 # concurrent forward programs per SM (shared memory bound)
    summary_cost: float = 0.7                # summary program cost per chunk, relative to a main one
    compose_cost: float = 2.5                # one sequential composition step, in chunk-steps
    backward_walk_cost: float = 3.0          # the backward's walks (states pass + adjoint walk) per
                                             # chunk-step, relative to the forward's (H200, 8/2 heads:
                                             # 2.9; benchmarks/results/segment_len_h200.md)
    mode: str = "gate"                       # "gate" or "exact" (see the module docstring)
    warmup_chunks: int = WARMUP_CHUNKS       # gate mode: chunks of warm-up before a segment

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"intra-CP enabled must be a bool, got {self.enabled!r}")
        if self.segment_len is not None and (not isinstance(self.segment_len, int) or self.segment_len <= 0
                                             or self.segment_len % CHUNK):
            raise ValueError(f"intra-CP segment_len must be a positive multiple of {CHUNK} tokens or None, "
                             f"got {self.segment_len!r}")
        if self.mode not in ("exact", "gate"):
            raise ValueError(f"intra-CP mode must be 'exact' or 'gate', got {self.mode!r}")
        if not isinstance(self.warmup_chunks, int) or self.warmup_chunks < 1:
            raise ValueError(f"intra-CP warmup_chunks must be an int >= 1, got {self.warmup_chunks!r}")
        for name in ("summary_cost", "compose_cost", "backward_walk_cost"):
            x = getattr(self, name)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not x >= 0:
                raise ValueError(f"intra-CP {name} must be a number >= 0, got {x!r}")

    @property
    def gate_chunks(self) -> int:
        """The warm-up the summary kernels take: warmup_chunks in gate mode, 0 (exact) otherwise."""
        return self.warmup_chunks if self.mode == "gate" else 0

    @staticmethod
    def from_env() -> "IntraCPConfig":
        """The default config: options.default_options().intra_cp (the QLA_MEGATRON_INTRA_CP*
        variables, read once per process); kept for callers that ask for it by this name."""
        from .options import default_options  # options.py imports this module
        return default_options().intra_cp


def _pass_time(programs: dict, slots: int) -> float:
    """Estimated time of one pass in chunk-steps: programs {length in chunks: count} placed longest
    first onto the least-loaded of `slots` concurrent slots (list scheduling), so that waves are
    whole: 192 programs of 128 chunks on 132 slots take 256 chunk-steps, not 186. A group of at least
    `slots` programs is placed a full round at a time (one program on every slot)."""
    loads = [0.0] * slots
    for length in sorted(programs, reverse=True):
        count = programs[length]
        rounds, count = divmod(count, slots)
        if rounds:
            loads = [x + rounds * length for x in loads]
        heapq.heapify(loads)
        for _ in range(count):
            heapq.heapreplace(loads, loads[0] + length)
    return max(loads)


def _programs(chunks_per_seq: Sequence[int], seg: int, per_segment: int, walk=None) -> dict:
    """{length: count} of a pass over every sequence cut into segments of `seg` chunks (the last one
    shorter), `per_segment` programs a segment; walk(segment chunks) -> the chunks a program walks;
    None: all of them."""
    out = {}
    for nc in chunks_per_seq:
        full, rest = divmod(nc, seg)
        for length, n in ((seg, full), (rest, 1)):
            w = length if walk is None else walk(length)
            if n and w:
                out[w] = out.get(w, 0) + n * per_segment
    return out


def plan_segment_len(seq_lens: Sequence[int], HV: int, K: int, V: int, num_sms: int, BV: int = 64,
                     config: Optional[IntraCPConfig] = None) -> Optional[int]:
    """Segment length in tokens (a multiple of 64), or None to run every sequence whole.

    seq_lens: tokens of every sequence (batch rows or varlen pieces). num_sms: the card's SM count.
    """
    cfg = config if config is not None else IntraCPConfig.from_env()
    if not cfg.enabled:
        return None
    return _plan_segment_len(tuple(seq_lens), HV, K, V, num_sms, BV, cfg)


def packed_segment_len(T: int, N: int, HV: int, K: int, V: int, num_sms: int, BV: int = 64,
                       config: Optional[IntraCPConfig] = None) -> Optional[int]:
    """Segment length for N sequences packed into T tokens, from these shapes only (the lengths are
    on the device): plan_segment_len for the packing with the longest sequence they allow, T - N + 1
    tokens (and N - 1 of one token). None when that sequence fits in one segment.

    Why the worst case: a packing's slowest sequence bounds the pass, and only sequences longer than
    the segment are cut, so packings of short sequences run uncut (their summary and composition
    launches have only padding rows). On the cost model above, against the length-aware planner
    (random packings of 8k-128k tokens at 8-64 v-heads; docs/segments.md): where cutting pays, equal
    at the median, within 7% at the 90th percentile; where it does not, uncut at the median, 1.47x
    slower at the 90th percentile (small totals with one sequence just above the segment length)."""
    cfg = config if config is not None else IntraCPConfig.from_env()
    if not cfg.enabled:
        return None
    seg = _packed_segment_len(T, N, HV, K, V, num_sms, BV, cfg)
    return seg if seg is not None and seg < T - N + 1 else None


@functools.lru_cache(maxsize=256)
def _packed_segment_len(T, N, HV, K, V, num_sms, BV, cfg):
    return _plan_segment_len((T - N + 1,) + (1,) * (N - 1), HV, K, V, num_sms, BV, cfg)


@functools.lru_cache(maxsize=256)
def _plan_segment_len(seq_lens: tuple, HV: int, K: int, V: int, num_sms: int, BV: int,
                      cfg: IntraCPConfig) -> Optional[int]:
    """plan_segment_len's search, cached: it runs on every call of the op, in Python."""
    if cfg.segment_len is not None:  # checked by IntraCPConfig
        return cfg.segment_len
    chunks = [-(-L // CHUNK) for L in seq_lens]
    longest = max(chunks)
    slots = num_sms * cfg.programs_per_sm
    main_progs, sum_progs = V // BV, (K + V) // BV
    walks = 1.0 + cfg.backward_walk_cost
    best, best_t = None, walks * _pass_time(_programs(chunks, longest, HV * main_progs), slots)
    seen = {longest}
    # Summaries for every segment with a successor; gate mode: warm-up walks (decaying heads).
    walk = (lambda L: min(L, cfg.warmup_chunks)) if cfg.mode == "gate" else None
    for n_seg in range(2, longest // max(1, cfg.min_segment_chunks) + 1):
        seg = -(-longest // n_seg)                          # the longest sequence in n_seg segments
        if seg in seen or seg < cfg.min_segment_chunks:
            continue
        seen.add(seg)
        with_next = [(nc - 1) // seg * seg for nc in chunks]
        summ = _pass_time(_programs([c for c in with_next if c], seg, HV * sum_progs, walk), slots)
        steps = max((nc - 1) // seg for nc in chunks)      # sequential composition steps
        t = (walks * _pass_time(_programs(chunks, seg, HV * main_progs), slots)
             + 2 * (cfg.summary_cost * summ + 2.0 + cfg.compose_cost * steps))   # forward and backward
        if t < best_t * 0.95:
            best, best_t = seg * CHUNK, t
    return best
