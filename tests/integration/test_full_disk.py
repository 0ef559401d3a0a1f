"""A real full disk: a run whose output_dir is on a small tmpfs that fills up (a ballast file, written while the
run is paused right after its first checkpoint) stops at its next save with one line naming the file, ENOSPC and
the free space, leaves no partial directory and its first checkpoint intact; with space again, the same command
resumes from that checkpoint and finishes. Skipped where mounting a tmpfs is not permitted (not root)."""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import fault_runs as fr

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(directory, leave=64 << 10):
    """A ballast file taking all but `leave` bytes of the filesystem."""
    free = shutil.disk_usage(directory).free
    with open(directory / "ballast", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(free - leave, 0))


def test_a_full_disk_stops_the_run_naming_the_file_and_keeps_the_last_checkpoint(small_disk, tmp_path):
    out, data, log = small_disk / "run", tmp_path / "data", tmp_path / "run.log"
    extra = {"checkpoint.save_every_steps": 2, "checkpoint.export_hf": "false"}
    proc = fr.start("python", out, data, log, **extra)
    first = out / "checkpoints" / "step-00000002"
    try:
        deadline = time.monotonic() + fr.TIMEOUT
        while not first.is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGSTOP)
        kept = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
        _fill(small_disk)
        os.killpg(proc.pid, signal.SIGCONT)
        proc.wait(timeout=fr.TIMEOUT)
    finally:
        fr.stop_group(proc)
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    print(errors)
    assert proc.returncode == 2 and len(errors) == 1, text[-4000:]
    assert re.search(rf"error: checkpoint save failed: ENOSPC \(No space left on device\) writing {out}/checkpoints/"
                     rf"\.tmp-step-\d+/\S+; [\d.]+ \w*B? ?\w* free on {small_disk}; the partial \.tmp-step-\d+ was "
                     rf"removed and the previous checkpoint {first} is untouched", errors[0]), errors[0]
    assert "Traceback" not in text
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == kept

    (small_disk / "ballast").unlink()
    resumed = fr.run("python", out, data, **extra)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {first}" in resumed.stdout and "done: best accuracy" in resumed.stdout
