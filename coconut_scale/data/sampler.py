"""A global-first batch sampler: the same optimizer steps see the same examples at any world size.

Each epoch draws one permutation of the training set from (seed, epoch), identical on every rank. Optimizer
step s takes the next `global_batch_size` examples and cuts them into `world_size * grad_accum` micro-batches
of `micro_batch_size`; rank r processes micro-batches r*accum .. r*accum+accum-1. One rank with accum 2 and
two ranks with accum 1 therefore compute gradients over the same micro-batches (the world-size invariance
test), and resuming at step k is just starting the iteration there.

The incomplete last global batch of an epoch is dropped (the permutation changes every epoch).

Evaluation (validation loss, generation) shards the other way, without shuffling: rank r takes examples
r, r+world, r+2*world, ... in consecutive batches (`shard_batches`). Every rank must run the same number of
batches (ZeRO-3 gathers parameters collectively), so a rank with a shorter shard pads with filler batches; the
caller agrees on that number across ranks (evaluate/generation.py all-reduces `local_batch_count`).
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch


class GlobalBatchSampler:
    def __init__(self, n_examples: int, plan, rank: int, seed: int = 0):
        self.n = n_examples
        self.plan = plan
        self.rank = rank
        self.seed = seed

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.plan.global_batch_size

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches (lists of example indices) from optimizer step `start_step` on."""
        order = self.permutation(epoch)
        micro, accum = self.plan.micro_batch_size, self.plan.grad_accum
        per_rank = micro * accum
        for step in range(start_step, self.steps_per_epoch):
            base = step * self.plan.global_batch_size + self.rank * per_rank
            for a in range(accum):
                yield order[base + a * micro : base + (a + 1) * micro]


class ShardBatch(NamedTuple):
    indices: list[int]  # positions in the full example list
    filler: bool  # a dummy batch that keeps this rank in step; its outputs must not count


def local_batch_count(n_examples: int, batch_size: int, rank: int, world: int) -> int:
    """Batches of this rank's own shard (before fillers)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return math.ceil(len(range(rank, n_examples, world)) / batch_size)


def shard_batches(n_examples: int, batch_size: int, rank: int, world: int, n_batches: int) -> list[ShardBatch]:
    """This rank's `n_batches` evaluation batches: its shard examples[rank::world] cut into consecutive batches
    of `batch_size`, then filler batches (example 0 alone) up to `n_batches` (the largest local_batch_count of
    any rank)."""
    shard = list(range(rank, n_examples, world))
    real = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    if n_batches < len(real):
        raise ValueError(f"n_batches={n_batches} is fewer than rank {rank}'s {len(real)} batches")
    if n_batches > len(real) and n_examples == 0:
        raise ValueError(f"{n_batches} batches asked of an empty example list (no example to use as filler)")
    return [ShardBatch(b, False) for b in real] + [ShardBatch([0], True)] * (n_batches - len(real))
