"""The environment of a child process that runs this checkout's package (a training run, a script by path)."""

import os
import signal
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


def default_sigint() -> None:
    """`preexec_fn` for a child that a test interrupts with SIGINT. A shell that starts the suite in the background
    (`pytest ... &` without job control, a CI step, nohup under sh) sets SIGINT to ignored, children inherit that,
    and Python then never raises KeyboardInterrupt: the child would run on to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
