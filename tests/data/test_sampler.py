"""data/sampler.py: the global-first training sampler and the evaluation shard batches, tested directly."""

import pytest

from coconut_scale.config.batch_plan import BatchPlan
from coconut_scale.data.sampler import GlobalBatchSampler, ShardBatch, local_batch_count, shard_batches

N, GLOBAL = 70, 8  # 70 examples: 8 full global batches, 6 examples left over


def plan(world: int, micro: int) -> BatchPlan:
    accum = GLOBAL // (world * micro)
    assert world * micro * accum == GLOBAL
    return BatchPlan(world_size=world, micro_batch_size=micro, grad_accum=accum, global_batch_size=GLOBAL,
                     tokens_per_step=GLOBAL * 16)


def steps(world: int, micro: int, epoch: int = 0, start_step: int = 0, seed: int = 3) -> list[list[list[int]]]:
    """Per optimizer step, every micro-batch of every rank in rank order (what the step's gradient averages)."""
    p = plan(world, micro)
    per_rank = [list(GlobalBatchSampler(N, p, r, seed=seed).micro_batches(epoch, start_step)) for r in range(world)]
    out = []
    for step in range(len(per_rank[0]) // p.grad_accum):
        out.append([mb for r in range(world) for mb in per_rank[r][step * p.grad_accum:(step + 1) * p.grad_accum]])
    return out


def test_every_world_size_sees_the_same_micro_batches():
    one_rank = steps(world=1, micro=4)  # accum 2
    assert steps(world=2, micro=4) == one_rank  # accum 1
    assert len(one_rank) == N // GLOBAL
    # A different micro size cuts the same global batches differently, but each step still holds the same examples.
    for a, b in zip(steps(world=1, micro=2), steps(world=4, micro=2)):
        assert a == b
    for a, b in zip(one_rank, steps(world=8, micro=1)):
        assert sorted(i for mb in a for i in mb) == sorted(i for mb in b for i in mb)


@pytest.mark.parametrize("world,micro", [(1, 4), (2, 2), (4, 1)])
def test_resume_at_step_k_is_the_tail_of_the_full_iteration(world, micro):
    full = steps(world, micro, epoch=1)
    for k in (0, 3, len(full) - 1, len(full)):
        assert steps(world, micro, epoch=1, start_step=k) == full[k:]


def test_epochs_and_seeds_draw_different_orders():
    s = GlobalBatchSampler(N, plan(1, 4), 0, seed=3)
    assert s.permutation(0) != s.permutation(1)
    assert sorted(s.permutation(0)) == list(range(N))
    assert GlobalBatchSampler(N, plan(1, 4), 0, seed=4).permutation(0) != s.permutation(0)
    assert steps(1, 4, epoch=0) != steps(1, 4, epoch=1)


def test_the_incomplete_last_global_batch_is_dropped():
    s = GlobalBatchSampler(N, plan(2, 2), 1, seed=3)
    assert s.steps_per_epoch == N // GLOBAL
    seen = [i for step in steps(2, 2) for mb in step for i in mb]
    assert len(seen) == (N // GLOBAL) * GLOBAL == len(set(seen))
    assert sorted(set(range(N)) - set(seen)) == sorted(s.permutation(0)[len(seen):])  # the permutation's tail
    assert GlobalBatchSampler(GLOBAL - 1, plan(1, 4), 0).steps_per_epoch == 0
    assert list(GlobalBatchSampler(GLOBAL - 1, plan(1, 4), 0).micro_batches(0)) == []


def test_ranks_are_disjoint_and_micro_batches_full():
    p = plan(4, 1)
    per_rank = [[i for mb in GlobalBatchSampler(N, p, r, seed=3).micro_batches(2) for i in mb] for r in range(4)]
    for r in range(4):
        for q in range(r + 1, 4):
            assert not set(per_rank[r]) & set(per_rank[q]), (r, q)
    for mb in GlobalBatchSampler(N, plan(2, 2), 1).micro_batches(0):
        assert len(mb) == 2


# -- evaluation shards -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,world,batch", [(7, 2, 1), (7, 2, 3), (10, 3, 2), (1, 2, 4), (5, 1, 2), (8, 4, 2)])
def test_shard_batches_cover_every_example_once_with_equal_counts(n, world, batch):
    n_batches = max(local_batch_count(n, batch, r, world) for r in range(world))
    per_rank = [shard_batches(n, batch, r, world, n_batches) for r in range(world)]
    assert {len(b) for b in per_rank} == {n_batches}  # the same number of model calls on every rank
    real = [i for rank in per_rank for b in rank if not b.filler for i in b.indices]
    assert sorted(real) == list(range(n))
    for r, batches in enumerate(per_rank):
        assert [i for b in batches if not b.filler for i in b.indices] == list(range(r, n, world))
        assert all(0 < len(b.indices) <= batch for b in batches)
        fillers = [b for b in batches if b.filler]
        assert all(b.indices == [0] for b in fillers)
        assert all(b.filler for b in batches[len(batches) - len(fillers):]), "fillers come last"


def test_uneven_shards_get_fillers_on_the_short_rank():
    # 7 examples, 2 ranks, batch 1: rank 0 has 4 batches, rank 1 has 3 and one filler.
    assert local_batch_count(7, 1, 0, 2) == 4 and local_batch_count(7, 1, 1, 2) == 3
    assert shard_batches(7, 1, 1, 2, 4) == [ShardBatch([1], False), ShardBatch([3], False), ShardBatch([5], False),
                                            ShardBatch([0], True)]
    assert shard_batches(7, 3, 0, 2, 2) == [ShardBatch([0, 2, 4], False), ShardBatch([6], False)]


def test_shard_batches_reject_impossible_counts():
    with pytest.raises(ValueError, match="fewer than rank 0's 4 batches"):
        shard_batches(7, 1, 0, 2, 3)
    with pytest.raises(ValueError, match="empty example list"):
        shard_batches(0, 2, 0, 2, 1)
    assert shard_batches(0, 2, 1, 2, 0) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        local_batch_count(5, 0, 0, 1)
