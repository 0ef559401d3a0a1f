"""Storage faults, named: an OSError while saving a checkpoint or writing an export (ENOSPC, EIO, EDQUOT, EROFS,
also when a library hides it in its own error) stops the save with one line naming the file, the errno's meaning
and the free space; the partial directory is removed and the previous checkpoint untouched; leftovers of
interrupted writes are removed at start with a line; low free space before a save is a warning with both figures."""

import errno
import os
from pathlib import Path

import pytest

from coconut_scale.atomic_files import AtomicDir
from coconut_scale.train import storage
from coconut_scale.train.checkpoints import CheckpointManager
from coconut_scale.train.state import TrainState


class Strategy:
    """Writes one shard per save as DeepSpeed would; `fail` makes the shard write fail as the real strategy reports
    it (the (file, error) pairs of DeepSpeed's writes that failed)."""

    def __init__(self, fail: BaseException | None = None):
        self.fail = fail

    def save_checkpoint(self, directory, tag):
        (directory / tag).mkdir(parents=True)
        shard = directory / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.write_text("weights")
        return [(str(shard), self.fail)] if self.fail is not None else []


def _state(step):
    return TrainState(step_in_epoch=step, global_step=step, stage=0).state_dict()


def _saved_then_failing(tmp_path, error):
    ckpts = CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    previous = ckpts.save(Strategy(), _state(2))
    before = {p.name: p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    with pytest.raises(storage.StorageError) as caught:
        ckpts.save(Strategy(error), _state(4))
    message = str(caught.value)
    print(message)
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000004").exists()  # the partial directory is gone
    assert not (tmp_path / "checkpoints" / "step-00000004").exists()
    assert {p.name: p.read_bytes() for p in previous.rglob("*") if p.is_file()} == before
    assert ckpts.resume_point(log=lambda line: None) == previous
    assert f"the previous checkpoint {previous} is untouched" in message
    assert "the partial .tmp-step-00000004 was removed" in message
    return message


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS])
def test_an_oserror_in_a_shard_write_is_one_line_naming_file_errno_and_free_space(tmp_path, code):
    message = _saved_then_failing(tmp_path, OSError(code, os.strerror(code)))
    shard = tmp_path / "checkpoints" / ".tmp-step-00000004" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert message.startswith(f"checkpoint save failed: {errno.errorcode[code]} ({os.strerror(code)}) writing {shard}")
    assert " free on /" in message and "\n" not in message


def test_torch_saves_full_disk_error_is_traced_to_its_errno_by_a_probe(tmp_path, monkeypatch):
    """torch.save's zip writer reports a full disk as 'unexpected pos'; a probe write beside it finds the errno."""
    monkeypatch.setattr(storage, "_probe", lambda directory: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 497024 vs 496912")
    assert "EDQUOT (Disk quota exceeded)" in _saved_then_failing(tmp_path, error)


def test_a_failing_rename_into_place_is_named_too(tmp_path, monkeypatch):
    ckpts = CheckpointManager(tmp_path / "checkpoints")
    ckpts.save(Strategy(), _state(2))

    def read_only(self):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.tmp))

    monkeypatch.setattr(AtomicDir, "commit", read_only)
    with pytest.raises(storage.StorageError, match=r"EROFS \(Read-only file system\) writing .*\.tmp-step-00000004"):
        ckpts.save(Strategy(), _state(4))


def test_a_bug_in_a_save_keeps_its_traceback(tmp_path):
    with pytest.raises(KeyError):
        CheckpointManager(tmp_path).save(Strategy(KeyError("not a storage fault")), _state(2))


def test_low_free_space_before_a_save_is_a_warning_with_both_figures(tmp_path, monkeypatch):
    ckpts = CheckpointManager(tmp_path / "checkpoints", expected_bytes=5_000_000)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1_200_000)
    lines = []
    ckpts.save(Strategy(), _state(2), log=lines.append)
    print(lines[0])
    assert len(lines) == 1 and "1.2 MB free" in lines[0] and "5.0 MB a checkpoint is expected to take" in lines[0]
    lines.clear()
    monkeypatch.setattr(storage, "free_bytes", lambda path: 10)
    ckpts.save(Strategy(), _state(4), log=lines.append)  # now the last checkpoint's real size is the figure
    assert len(lines) == 1 and "the size of step-00000002" in lines[0]


def test_leftovers_of_interrupted_writes_are_removed_with_a_line(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step-00000007" / "ds").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-00000007" / "ds" / "shard").write_bytes(b"x" * 2000)
    (tmp_path / "hf" / ".tmp-stage1").mkdir(parents=True)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".epoch001.jsonl.0123abcd.tmp").write_text("half")
    (tmp_path / "hf" / "stage0").mkdir()
    lines = []
    removed = storage.remove_leftovers([tmp_path / "checkpoints", tmp_path / "hf", tmp_path / "samples"], lines.append)
    print(lines[0])
    assert len(removed) == 3 and len(lines) == 1 and "removed 3 leftover(s) of an interrupted run" in lines[0]
    assert ".tmp-step-00000007 (2.0 kB)" in lines[0] and (tmp_path / "hf" / "stage0").is_dir()
    assert not any(p.name.startswith(".") for d in ("checkpoints", "hf", "samples") for p in (tmp_path / d).iterdir())


def test_a_failed_export_write_names_the_errno_and_keeps_the_previous_export(tmp_path, monkeypatch):
    from coconut_scale.train import export as export_module

    out = tmp_path / "hf" / "stage1"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_text("the previous export")

    def full_disk(*args, **kwargs):  # what safetensors raises on a full disk
        (tmp_path / "hf" / ".tmp-stage1").mkdir(exist_ok=True)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export_module, "_write_export", full_disk)

    class Consolidating:
        model = None

        def consolidated_state_dict(self):
            return {}

    with pytest.raises(storage.StorageError) as caught:
        export_module.export_hf(Consolidating(), None, out, meta=None)
    print(caught.value)
    assert str(caught.value).startswith("export failed: ENOSPC (No space left on device) writing ")
    assert f"the previous {out} is untouched" in str(caught.value)
    assert (out / "model.safetensors").read_text() == "the previous export"


def test_human_bytes():
    assert [storage.human_bytes(n) for n in (0, 999, 1500, 2.5e9)] == ["0 bytes", "999 bytes", "1.5 kB", "2.5 GB"]
    assert storage.free_bytes(Path("/definitely/not/here")) is not None  # its nearest existing parent's
