"""The tiny recipe trained in a child process, as the end-to-end tests run it: its overrides, the command for each
launcher, a run that must succeed, and a run killed at a checkpoint.

Every run trains recipes/tiny_cpu.yaml through a stage boundary with an optimizer reset (3 epochs, stages 0-1-2),
with stage mixing (uniform_prob) so that ranks hold different latent counts in the same step, and an odd
validation set so evaluation shards are uneven. All runs are under a timeout: a hang fails the test.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from child_process import subprocess_env

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 420


def overrides(out: Path, data: Path, **extra) -> list[str]:
    base = {
        "output_dir": str(out),
        "data.train_file": str(data / "train.json"),
        "data.val_file": str(data / "val.json"),
        "data.generate": "{kind: prosqa_synthetic, n_train: 48, n_val: 9, seed: 3}",
        "optim.epochs": 3,
        "optim.grad_clip": 0.0,
        "coconut.max_latent_stage": 2,
        "coconut.uniform_prob": 0.3,
        "batch.global_batch_size": 4,
        "batch.micro_batch_size": 2,
        "batch.eval_batch_size": 4,
        "eval.max_new_tokens": 6,
        "logging.log_every_steps": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def command(launcher: str, recipe_overrides: list[str]) -> list[str]:
    """The training command under `launcher`: python (one process), torchrun or deepspeed (two ranks)."""
    recipe = str(REPO / "recipes" / "tiny_cpu.yaml")
    if launcher == "python":
        return [sys.executable, "-m", "coconut_scale.train", recipe, *recipe_overrides]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "coconut_scale.train", recipe, *recipe_overrides]
    if launcher == "deepspeed":
        port = str(29600 + os.getpid() % 300)
        return ["deepspeed", "--num_gpus", "2", "--master_port", port, "--module", "coconut_scale.train",
                recipe, *recipe_overrides]
    raise ValueError(launcher)


def run(launcher: str, out: Path, data: Path, **extra) -> subprocess.CompletedProcess:
    """Train to the end under `launcher`; fails the test (with the output's tail) unless the run exits 0."""
    proc = subprocess.run(command(launcher, overrides(out, data, **extra)), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{launcher} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def kill_at_checkpoint(out: Path, data: Path, step: int, **extra) -> None:
    """Start a one-process run and SIGKILL it (its whole process group) once checkpoint `step` exists."""
    proc = subprocess.Popen(command("python", overrides(out, data, **extra)), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    target = out / "checkpoints" / f"step-{step:08d}"
    deadline = time.time() + TIMEOUT
    while not target.exists():
        assert proc.poll() is None, "run ended before the checkpoint to kill at"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
