"""One run per output_dir: the lock refuses a second holder, takes over a dead one's, and a second real run stops
at once (exit 2) naming the first one's pid."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from child_process import subprocess_env
from coconut_scale.train.run_lock import LOCK_FILE, RunLock, RunLockError

REPO = Path(__file__).resolve().parents[2]

HOLD = ("import sys, time; from coconut_scale.train.run_lock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")


def _env():
    return subprocess_env()


def test_a_held_lock_refuses_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError, match=rf"in use by another run: pid {holder.pid} on host "
                                               rf"{socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lines = []
    lock = RunLock(tmp_path)
    lock.acquire(log=lines.append)  # its holder was killed: the kernel dropped the lock, the record is stale
    assert len(lines) == 1 and "taking over the stale run lock" in lines[0] and f"pid {holder.pid}" in lines[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end: the next run takes it without a word
    quiet = []
    RunLock(tmp_path).acquire(log=quiet.append)
    assert quiet == []


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                  "started": time.time() - 3600}))
    lines = []
    lock = RunLock(tmp_path)
    lock.acquire(log=lines.append)
    assert len(lines) == 1 and f"pid {dead.pid}" in lines[0] and "that run is gone" in lines[0]
    # Taken over: the record names this process, and the lock is held (another acquire is refused naming it).
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockError, match=rf"pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    lock.release()


def _train(out, data, epochs=1):
    return [sys.executable, "-m", "coconut_scale.train", str(REPO / "recipes" / "tiny_cpu.yaml"),
            f"output_dir={out}", f"data.train_file={data / 'train.json'}", f"data.val_file={data / 'val.json'}",
            "data.generate={kind: prosqa_synthetic, n_train: 48, n_val: 9, seed: 3}", f"optim.epochs={epochs}",
            "batch.global_batch_size=4", "eval.max_new_tokens=4"]


@pytest.mark.slow
def test_two_runs_on_one_output_dir_the_second_stops_naming_the_first(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    first = subprocess.Popen(_train(out, data, epochs=4), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ((out / LOCK_FILE).is_file() and (out / LOCK_FILE).read_text()):
            assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(_train(out, data), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second one was refused"
    finally:
        os.killpg(first.pid, 9)
        first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {first.pid} on host" in errors[0], second.stderr[-3000:]
    assert "model:" not in second.stdout  # refused before any model was built
