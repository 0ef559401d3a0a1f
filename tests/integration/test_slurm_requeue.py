"""launch/slurm.sbatch under fake SLURM (srun, scontrol on PATH): it asks for SIGUSR1 ahead of the time limit and
for requeueing, waits for srun through the signals it gets itself, and requeues the job when the ranks stopped on a
signal with a checkpoint (exit 75), and only then."""

import os
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

import fault_runs as fr

SBATCH = fr.REPO / "launch" / "slurm.sbatch"


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _sbatch(tmp_path, srun_body: str, signal_after_s: float | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    _fake(bin_dir, "scontrol", f"""#!/bin/sh
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-7\\n'; exit 0; fi
echo "$*" >> {shlex.quote(str(log))}
""")
    _fake(bin_dir, "srun", "#!/usr/bin/env bash\n" + srun_body)
    env = fr.env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-7", SLURM_JOB_ID="4242",
                 SLURM_GPUS_ON_NODE="1", SLURM_SUBMIT_DIR=str(fr.REPO), HOSTFILE_DIR=str(tmp_path / "hostfiles"))
    proc = subprocess.Popen(["bash", str(SBATCH), "recipes/tiny_cpu.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_after_s is not None:
        time.sleep(signal_after_s)
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err, log.read_text() if log.exists() else ""


def test_the_batch_script_asks_for_the_signal_ahead_of_the_limit_and_for_requeueing():
    lines = SBATCH.read_text().splitlines()
    assert "#SBATCH --signal=USR1@300" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --open-mode=append" in lines  # a requeued job appends to its log


def test_exit_75_requeues_the_job_and_the_shell_survives_the_signal(tmp_path):
    code, err, calls = _sbatch(tmp_path, "sleep 2\nexit 75\n", signal_after_s=0.5)
    assert code == 75, err
    assert "signal received" in err and "requeueing job 4242" in err
    assert calls.strip() == "requeue 4242"


@pytest.mark.parametrize("exit_code", [0, 1, 2])
def test_any_other_exit_is_not_requeued(tmp_path, exit_code):
    code, err, calls = _sbatch(tmp_path, f"exit {exit_code}\n")
    assert code == exit_code and calls == "", err
