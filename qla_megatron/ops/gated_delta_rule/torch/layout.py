"""Chunk layout of packed sequences for the torch backend.

Every sequence (a batch row or a varlen piece) becomes whole chunks of C tokens; the tail of its last
chunk is padding that leaves the state unchanged (g = 0, beta = 0, k = v = 0). The state walk visits
chunk position j = 0, 1, ... of every sequence at once; sequences are ordered longest first so that
those still running at step j are a prefix of length active_at[j].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkLayout:
    N: int                   # sequences
    NC: int                  # chunks in all
    C: int                   # chunk size
    pos: torch.Tensor        # [T] position of every token in the padded stream [NC * C]
    order: torch.Tensor      # [N] sequences, longest first
    inverse: torch.Tensor    # [N] inverse permutation of order
    active_at: tuple         # active_at[j]: sequences with more than j chunks (steps + 1 entries)
    walk: torch.Tensor       # [NC] chunk index of every (step, active sequence), step-major
    walk_off: tuple          # walk[walk_off[j]:walk_off[j + 1]] are the chunks of step j

    @property
    def steps(self) -> int:
        return len(self.active_at) - 1

    def step_chunks(self, j: int) -> torch.Tensor:
        return self.walk[self.walk_off[j]:self.walk_off[j + 1]]

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] tokens -> [NC, C, ...] zero-padded chunks."""
        padded = x.new_zeros((self.NC * self.C,) + tuple(x.shape[1:])).index_copy(0, self.pos, x)
        return padded.view((self.NC, self.C) + tuple(x.shape[1:]))

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[NC, C, ...] chunks -> [T, ...] tokens (drops the padding)."""
        return x.reshape((self.NC * self.C,) + tuple(x.shape[2:]))[self.pos]


def chunk_layout(bounds, C: int, device) -> ChunkLayout:
    """Layout of the sequences whose token offsets in the packed stream are `bounds` (N + 1 ints)."""
    N = len(bounds) - 1
    lens = [bounds[n + 1] - bounds[n] for n in range(N)]
    nchunks = [-(-L // C) for L in lens]
    chunk_off = [0]
    for nc in nchunks:
        chunk_off.append(chunk_off[-1] + nc)
    seq_of = torch.repeat_interleave(torch.arange(N, device=device), torch.tensor(lens, device=device))
    T = bounds[-1] - bounds[0]
    starts = torch.tensor(bounds[:-1], device=device) - bounds[0]
    pos = torch.tensor(chunk_off[:-1], device=device)[seq_of] * C + torch.arange(T, device=device) - starts[seq_of]

    order = sorted(range(N), key=lambda n: -nchunks[n])
    steps = nchunks[order[0]] if N else 0
    active_at = tuple(sum(1 for n in order if nchunks[n] > j) for j in range(steps + 1))
    walk = [chunk_off[n] + j for j in range(steps) for n in order[:active_at[j]]]
    walk_off = [0]
    for j in range(steps):
        walk_off.append(walk_off[-1] + active_at[j])
    order_t = torch.tensor(order, device=device)
    inverse = torch.empty(N, dtype=torch.long, device=device)
    inverse[order_t] = torch.arange(N, device=device)
    return ChunkLayout(N=N, NC=chunk_off[-1], C=C, pos=pos, order=order_t, inverse=inverse,
                       active_at=active_at, walk=torch.tensor(walk, device=device, dtype=torch.long),
                       walk_off=tuple(walk_off))
