"""Tiny real training runs for the cluster-fault tests (preemption, full disks, dead ranks, changed data): the
command, its environment, and what a run leaves behind (logged losses, exported weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
TIMEOUT = 300
# 24 records / global batch 4 = 6 steps per epoch; two epochs (stages 0 and 1).
N_TRAIN, GLOBAL_BATCH, EPOCHS = 24, 4, 2


def env(**extra) -> dict:
    out = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GPUS_PER_NODE"):
        out.pop(key, None)
    out.update(extra)
    return out


def overrides(out: Path, data: Path, **extra) -> list[str]:
    base = {"output_dir": out, "data.train_file": data / "train.json", "data.val_file": data / "val.json",
            "data.generate": f"{{kind: prosqa_synthetic, n_train: {N_TRAIN}, n_val: 4, seed: 3}}",
            "optim.epochs": EPOCHS, "optim.grad_clip": 0.0, "batch.global_batch_size": GLOBAL_BATCH,
            "batch.micro_batch_size": 2, "batch.eval_batch_size": 4, "eval.max_new_tokens": 4,
            "logging.log_every_steps": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def command(launcher: str, args: list[str]) -> list[str]:
    train = ["-m", "coconut_scale.train", str(RECIPE), *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *train]
    return [sys.executable, *train]


def run(launcher: str, out: Path, data: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(command(launcher, overrides(out, data, **extra)), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def start(launcher: str, out: Path, data: Path, log: Path, **extra) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(command(launcher, overrides(out, data, **extra)), cwd=REPO, env=env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def losses(out: Path) -> dict[int, float]:
    """{global step: logged train loss}; a step trained again after a resume overwrites its line."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in rows if r["kind"] == "train"}


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = TIMEOUT) -> None:
    """Until metrics.jsonl has logged `step` (the run is in its training loop)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        if (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= step:
            return
        time.sleep(0.05)


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def export_bytes(out: Path) -> dict[str, bytes]:
    """Every exported weight file of a run, as bytes (bit-for-bit comparisons)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "hf").rglob("*.safetensors"))}
