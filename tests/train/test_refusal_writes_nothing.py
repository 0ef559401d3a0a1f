"""A recipe refused during setup leaves output_dir as it found it: a run whose every record is dropped by
data.max_seq_len (refused after the tokenizer was trained and the data tokenized) writes no .run.lock,
recipe.resolved.yaml, token_cache/ or tokenizer/; what setup writes is staged and moved into place only when setup
succeeded. The lock file's removal is safe for a run waiting on it."""

import os
import sys
from pathlib import Path

import pytest

from coconut_scale.train.run_lock import LOCK_FILE, RunLock

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "integration"))
import fault_runs as fr  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("existed", [False, True])
def test_every_record_dropped_is_refused_and_output_dir_is_left_as_found(tmp_path, existed):
    out, data = tmp_path / "run", tmp_path / "data"
    if existed:
        out.mkdir()
        (out / "notes.txt").write_text("the user's own file")
    refused = fr.run("python", out, data, **{"data.max_seq_len": 12})
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    print(errors)
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
    assert "all 24 records were dropped by data.max_seq_len=12" in errors[0] and str(data / "train.json") in errors[0]
    if existed:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()
    assert (data / "train.json").is_file()  # the generated data is the user's, outside output_dir: kept


def test_a_run_that_locked_the_removed_lock_file_tries_again(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    assert first.created
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)  # a second run opened the file before the first one removed it
    first.release(remove=True)
    assert not (tmp_path / LOCK_FILE).exists()
    second = RunLock(tmp_path)
    assert not second._still_the_file(fd)  # the inode it opened is gone: acquire would open the path again
    second.acquire()
    assert second._still_the_file(second._fd) and second.created
    os.close(fd)
    second.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""
