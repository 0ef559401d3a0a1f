"""The environment of a child process that runs this checkout's package (a training run, a script by path)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra) -> dict:
    """DeepSpeed on CPU, one thread, no wandb, unbuffered output, the checkout importable (scripts run by path do
    not see it unless the package is installed), and none of a launcher's rank variables leaking in from the
    calling shell. `extra` adds variables (DS_ACCELERATOR and the others set here cannot be overridden)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
