"""Preemption with a real signal: SIGTERM mid-run stops at the next optimizer step with a verified checkpoint, one
line naming it and exit code 75, well inside a 30 s grace; the resumed run ends bit-identical to an uninterrupted
one (exported weights and every logged loss), in one process and on two ranks under torchrun (whose agent
forwards the SIGTERM to its workers)."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

import fault_runs as fr

pytestmark = pytest.mark.slow
GRACE_S = 30
STOPPED = re.compile(r"^stopped by (SIG\w+) at global step (\d+) \(epoch \d+, step \d+\): checkpoint (\S+) saved and "
                     r"verified in [\d.]+ s; re-run the same command to resume \(exit code 75\)$", re.M)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("preempt_data")


def _preempt_then_resume(launcher, tmp_path, data, signal_to_send=signal.SIGTERM):
    out, log = tmp_path / "preempted", tmp_path / "preempted.log"
    proc = fr.start(launcher, out, data, log)
    try:
        fr.wait_for_step(proc, out, 2)
        sent = time.monotonic()
        proc.send_signal(signal_to_send)
        proc.wait(timeout=GRACE_S)
        took = time.monotonic() - sent
    finally:
        fr.stop_group(proc)
    text = log.read_text()
    found = STOPPED.findall(text)
    assert len(found) == 1, text[-4000:]
    print(next(line for line in text.splitlines() if line.startswith("stopped by")))
    name, step, checkpoint = found[0]
    assert name == signal_to_send.name and 2 <= int(step) < fr.EPOCHS * fr.N_TRAIN // fr.GLOBAL_BATCH
    assert checkpoint.endswith(f"step-{int(step):08d}") and (out / "checkpoints" / f"step-{int(step):08d}").is_dir()
    assert json.loads((out / "checkpoints" / f"step-{int(step):08d}" / "loop_state.json").read_text())[
        "global_step"] == int(step)
    assert took < GRACE_S
    if launcher == "python":
        assert proc.returncode == 75, text[-3000:]
    resumed = fr.run(launcher, out, data)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {checkpoint}" in resumed.stdout
    return out, int(step), took


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_a_sigterm_saves_at_the_next_step_and_the_resume_is_bit_identical(launcher, tmp_path, data):
    clean = tmp_path / "clean"
    proc = fr.run(launcher, clean, data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out, step, took = _preempt_then_resume(launcher, tmp_path, data)
    print(f"{launcher}: stopped at step {step}, {took:.1f} s after the signal")
    assert fr.losses(out) == fr.losses(clean)
    assert fr.export_bytes(out) == fr.export_bytes(clean)


def test_sigusr1_to_every_process_of_a_per_node_launch_exits_75_through_the_launchers(tmp_path, data):
    """What SLURM's --signal=USR1@T does: the signal reaches the deepspeed launcher processes too, which ignore it
    (launch/per_node_no_ssh.sh), while the rank saves; the rank's exit code 75 comes back through them."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(fr.REPO / "launch" / "per_node_no_ssh.sh"), str(hostfile), str(fr.RECIPE),
                                 *fr.overrides(out, data)], cwd=fr.REPO, stdout=fh, stderr=fh,
                                start_new_session=True,
                                env=fr.env(NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    try:
        fr.wait_for_step(proc, out, 2)
        os.killpg(proc.pid, signal.SIGUSR1)
        proc.wait(timeout=GRACE_S)
    finally:
        fr.stop_group(proc)
    text = log.read_text()
    assert proc.returncode == 75, text[-3000:]
    assert [f[0] for f in STOPPED.findall(text)] == ["SIGUSR1"], text[-3000:]
