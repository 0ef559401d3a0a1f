"""CheckpointManager, directly, with a stand-in strategy (no DeepSpeed): layout, atomicity, pruning, RNG, errors."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from coconut_scale.errors import UserError
from coconut_scale.file_manifest import coconut_scale_version
from coconut_scale.train.checkpoints import CheckpointManager
from coconut_scale.train.state import TrainState


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
    """A loop state the trainer's TrainState itself writes (and would accept back)."""
    return TrainState(step_in_epoch=step, global_step=step, stage=0).state_dict()


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


# -- manifests: nothing on disk is trusted unchecked --------------------------------------------------------------

def _two_checkpoints(tmp_path):
    ckpts = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    older = ckpts.save(FakeStrategy(), _state(4), {"recipe.resolved.yaml": "name: x\n"})
    newer = ckpts.save(FakeStrategy(), _state(8), {"recipe.resolved.yaml": "name: x\n"})
    return older, newer


def test_manifest_lists_every_file_with_size_and_digest_and_the_version(tmp_path):
    _, newer = _two_checkpoints(tmp_path)
    manifest = json.loads((newer / "manifest.json").read_text())
    files = manifest["files"]
    on_disk = {p.relative_to(newer).as_posix() for p in newer.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk and {"ds/shard.txt", "loop_state.json", "rng_rank0.json"} <= on_disk
    assert manifest["digest"] == "xxh3_128-256MiB" and manifest["coconut_scale"] == coconut_scale_version()
    assert files["ds/shard.txt"]["size"] == len("weights") and len(files["ds/shard.txt"]["xxh3_128-256MiB"]) == 32


def test_a_sha256_manifest_of_an_earlier_version_still_verifies(tmp_path):
    _, newer = _two_checkpoints(tmp_path)
    files = {n: {"size": (newer / n).stat().st_size, "sha256": hashlib.sha256((newer / n).read_bytes()).hexdigest()}
             for n in json.loads((newer / "manifest.json").read_text())["files"]}
    (newer / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
    assert CheckpointManager(tmp_path / "checkpoints").verify(newer) is None
    _flip(newer / "ds" / "shard.txt")
    assert "does not match the sha256" in CheckpointManager(tmp_path / "checkpoints").verify(newer)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:3])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, says", [
    (_truncate, "ds/shard.txt", "has 3 bytes, its manifest says 7"),
    (_flip, "ds/shard.txt", "does not match the xxh3_128-256MiB digest"),
    (lambda p: p.unlink(), "rng_rank0.json", "is missing"),
    (lambda p: p.write_text("{not json"), "manifest.json", "cannot be read"),
    (lambda p: p.unlink(), "manifest.json", "is missing"),
])
def test_damaged_newest_is_skipped_naming_the_file_and_the_newest_intact_one_is_used(tmp_path, damage, file, says):
    older, newer = _two_checkpoints(tmp_path)
    damage(newer / file)
    lines = []
    ckpts = CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    assert ckpts.resume_point(log=lines.append) == older
    assert len(lines) == 1 and str(newer / file) in lines[0] and says in lines[0], lines
    # Moved aside: no longer a candidate, and pruning cannot keep it in place of the intact one.
    assert not newer.exists() and (newer.parent / f"damaged-{newer.name}").is_dir()
    ckpts.load(FakeStrategy(), older)
    saved = ckpts.save(FakeStrategy(), _state(6))
    assert ckpts.complete() == [saved]


def test_no_intact_checkpoint_stops_instead_of_starting_over(tmp_path):
    older, newer = _two_checkpoints(tmp_path)
    _truncate(older / "ds" / "shard.txt")
    _flip(newer / "loop_state.json")
    with pytest.raises(UserError, match="no intact checkpoint"):
        CheckpointManager(tmp_path / "checkpoints").resume_point(log=lambda line: None)
    assert older.exists() and newer.exists()  # nothing moved: the user decides


def test_load_verifies_and_names_the_damaged_file(tmp_path):
    _, newer = _two_checkpoints(tmp_path)
    _flip(newer / "ds" / "shard.txt")
    with pytest.raises(UserError, match=r"ds/shard\.txt does not match"):
        CheckpointManager(tmp_path / "checkpoints").load(FakeStrategy(), newer)


def test_deepspeed_load_errors_name_the_checkpoint(tmp_path):
    class Broken(FakeStrategy):
        def load_checkpoint(self, directory, tag):
            raise RuntimeError("PytorchStreamReader failed reading zip archive")

    _, newer = _two_checkpoints(tmp_path)
    with pytest.raises(UserError, match=rf"{newer / 'ds'}.*PytorchStreamReader"):
        CheckpointManager(tmp_path / "checkpoints").load(Broken(), newer)


def test_pruning_always_keeps_the_checkpoint_just_written(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep_last=1)
    ckpts.save(FakeStrategy(), _state(30))  # e.g. from an earlier run with auto_resume off
    just_written = ckpts.save(FakeStrategy(), _state(5))
    assert ckpts.complete() == [just_written]


def test_a_torn_metrics_line_from_a_kill_is_cut_before_the_resumed_run_appends(tmp_path):
    from coconut_scale.train.run_log import RunLog

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "global_step": 1, "loss": 2.0}\n{"kind": "train", "global_st')
    log = RunLog(tmp_path)
    log.log("train", global_step=2, loss=1.5)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2]
