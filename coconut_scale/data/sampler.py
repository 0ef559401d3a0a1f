"""A global-first batch sampler: the same optimizer steps see the same examples at any world size.

Each epoch draws one permutation of the training set from (seed, epoch), identical on every rank. Optimizer
step s takes the next `global_batch_size` examples and cuts them into `world_size * grad_accum` micro-batches
of `micro_batch_size`; rank r processes micro-batches r*accum .. r*accum+accum-1. One rank with accum 2 and
two ranks with accum 1 therefore compute gradients over the same micro-batches (the world-size invariance
test), and resuming at step k is just starting the iteration there.

The incomplete last global batch of an epoch is dropped (the permutation changes every epoch).
"""

from __future__ import annotations

from typing import Iterator

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
