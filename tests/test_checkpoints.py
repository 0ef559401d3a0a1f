"""CheckpointManager, directly, with a stand-in strategy (no DeepSpeed): layout, atomicity, pruning, RNG, errors."""

import json
import random

import numpy as np
import pytest
import torch

from coconut_scale.errors import UserError
from coconut_scale.train.checkpoints import CheckpointManager


class FakeStrategy:
    """Writes and reads one file per tag, as DeepSpeed's save/load_checkpoint would write its shards."""

    def __init__(self):
        self.loaded = []

    def save_checkpoint(self, directory, tag):
        (directory / tag).mkdir(parents=True)
        (directory / tag / "shard.txt").write_text("weights")

    def load_checkpoint(self, directory, tag):
        assert (directory / tag / "shard.txt").read_text() == "weights"
        self.loaded.append((directory, tag))


def _state(step):
    return {"epoch": 0, "step_in_epoch": step, "global_step": step, "best_accuracy": -1.0, "stage": 0}


def test_save_is_complete_and_latest_is_highest_and_old_ones_pruned(tmp_path):
    ckpts = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    stale = tmp_path / "checkpoints" / ".tmp-step-00000099"
    stale.mkdir(parents=True)  # a save a crash interrupted: never a candidate, removed by the next save
    assert ckpts.latest() is None
    for step in (3, 10, 7):
        ckpts.save(FakeStrategy(), _state(step), {"recipe.resolved.yaml": "name: x\n"})
    names = [p.name for p in ckpts.complete()]
    assert names == ["step-00000007", "step-00000010"] and not stale.exists()
    latest = ckpts.latest()
    assert latest.name == "step-00000010"
    assert (latest / "recipe.resolved.yaml").read_text() == "name: x\n"
    assert json.loads((latest / "loop_state.json").read_text())["world_size"] == 1
    # The harness's own state is JSON (reading it back cannot run code); no pickle of ours in a checkpoint.
    assert not list(latest.glob("*.pt")) and (latest / "rng_rank0.json").is_file()


def test_load_restores_loop_state_and_every_rng(tmp_path):
    ckpts = CheckpointManager(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ckpts.save(FakeStrategy(), _state(5))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    strategy = FakeStrategy()
    state = ckpts.load(strategy, path)
    assert state["global_step"] == 5 and strategy.loaded == [(path, "ds")]
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_other_world_size_needs_the_universal_copy(tmp_path):
    ckpts = CheckpointManager(tmp_path)
    path = ckpts.save(FakeStrategy(), _state(4))
    assert not ckpts.needs_universal(path, 1)
    with pytest.raises(UserError, match=r"written by 1 ranks and this run has 2.*python -m coconut_scale.universal"):
        ckpts.needs_universal(path, 2)
    (path / "ds_universal").mkdir()
    assert ckpts.needs_universal(path, 2)


def test_step_dir_of_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoint"):
        CheckpointManager.step_dir_of(tmp_path)
    bare = tmp_path / "step-00000001"
    bare.mkdir()
    with pytest.raises(UserError, match="has no DeepSpeed checkpoint"):
        CheckpointManager.step_dir_of(bare)
    path = CheckpointManager(tmp_path / "checkpoints").save(FakeStrategy(), _state(2))
    assert CheckpointManager.step_dir_of(tmp_path) == path == CheckpointManager.step_dir_of(path)


def test_unreadable_loop_state_is_named(tmp_path):
    path = CheckpointManager(tmp_path).save(FakeStrategy(), _state(2))
    (path / "loop_state.json").write_text("{not json")
    with pytest.raises(UserError, match="loop_state.json"):
        CheckpointManager(tmp_path).load(FakeStrategy(), path)
