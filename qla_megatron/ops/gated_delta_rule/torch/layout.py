"""Chunk layout of packed sequences for the torch backend.

Every sequence (a batch row or a varlen piece) becomes whole chunks of C tokens; the tail of its last
chunk is padding that leaves the state unchanged (g = 0, beta = 0, k = v = 0). The state walk visits
chunk position j = 0, 1, ... of every sequence at once; sequences are ordered longest first so that
those still running at step j are a prefix of length active_at[j].

Chunks are stored in walk order (step-major: chunk j of every active sequence, longest sequence
first), so a step's chunks are one contiguous slice: the walks read them as views, with no gathers
(on a GPU the walk is launch-bound, and every gather was one more kernel a step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkLayout:
    N: int                   # sequences
    NC: int                  # chunks in all
    C: int                   # chunk size
    pos: torch.Tensor        # [T] position of every token in the padded stream [NC * C], walk order
    order: torch.Tensor      # [N] sequences, longest first
    inverse: torch.Tensor    # [N] inverse permutation of order
    active_at: tuple         # active_at[j]: sequences with more than j chunks (steps + 1 entries)
    walk_off: tuple          # chunks walk_off[j]:walk_off[j + 1] are those of step j, in `order`

    @property
    def steps(self) -> int:
        return len(self.active_at) - 1

    def step_chunks(self, j: int) -> slice:
        return slice(self.walk_off[j], self.walk_off[j + 1])

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] tokens -> [NC, C, ...] zero-padded chunks."""
        padded = x.new_zeros((self.NC * self.C,) + tuple(x.shape[1:])).index_copy(0, self.pos, x)
        return padded.view((self.NC, self.C) + tuple(x.shape[1:]))

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[NC, C, ...] chunks -> [T, ...] tokens (drops the padding)."""
        return x.reshape((self.NC * self.C,) + tuple(x.shape[2:]))[self.pos]


def chunk_layout(bounds, C: int, device) -> ChunkLayout:
    """Layout of the sequences whose token offsets in the packed stream are `bounds` (N + 1 ints).

    Cached by (bounds, C, device): the index tensors are built (host lists copied to the device) once
    per packing, so a call of a shape seen before launches nothing here and never waits for the device
    (which CUDA-graph capture needs). The cached tensors are read-only."""
    return _cached_layout(tuple(int(b) for b in bounds), int(C), torch.device(device))


@functools.lru_cache(maxsize=32)
def _cached_layout(bounds: tuple, C: int, device: torch.device) -> ChunkLayout:
    # Normal tensors even when first built under inference_mode, so later training calls can use them.
    with torch.inference_mode(False):
        return _build_layout(bounds, C, device)


def _build_layout(bounds: tuple, C: int, device: torch.device) -> ChunkLayout:
    N = len(bounds) - 1
    lens = [bounds[n + 1] - bounds[n] for n in range(N)]
    nchunks = [-(-L // C) for L in lens]
    order = sorted(range(N), key=lambda n: -nchunks[n])
    steps = nchunks[order[0]] if N else 0
    active_at = tuple(sum(1 for n in order if nchunks[n] > j) for j in range(steps + 1))
    walk_off = [0]
    for j in range(steps):
        walk_off.append(walk_off[-1] + active_at[j])
    # Chunk j of the sequence ranked r (longest first) sits at slot walk_off[j] + r.
    rank = [0] * N
    for r, n in enumerate(order):
        rank[n] = r
    T = bounds[-1] - bounds[0]
    lens_t = torch.tensor(lens, device=device)
    seq_of = torch.repeat_interleave(torch.arange(N, device=device), lens_t, output_size=T)  # no sync
    t_in_seq = torch.arange(T, device=device) - (torch.tensor(bounds[:-1], device=device) - bounds[0])[seq_of]
    walk_off_t = torch.tensor(walk_off[:-1] if steps else [0], device=device)
    slot = walk_off_t[t_in_seq // C] + torch.tensor(rank, device=device)[seq_of]
    pos = slot * C + t_in_seq % C
    order_t = torch.tensor(order, device=device)
    inverse = torch.empty(N, dtype=torch.long, device=device)
    inverse[order_t] = torch.arange(N, device=device)
    return ChunkLayout(N=N, NC=walk_off[-1], C=C, pos=pos, order=order_t, inverse=inverse,
                       active_at=active_at, walk_off=tuple(walk_off))
