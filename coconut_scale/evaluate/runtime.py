"""Plumbing shared by the evaluation CLIs: progress bars, PNGs, the error type for bad flags and inputs.

The process group they join and leave is coconut_scale.distributed's (init_for_inference, finish); outputs are
written with coconut_scale.atomic_files; errors exit through coconut_scale.errors.run_cli.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from coconut_scale import distributed as dist
from coconut_scale.atomic_files import atomic_write
from coconut_scale.errors import UserError


class InputError(UserError):
    """Bad user input (a checkpoint, data file, flag): reported as one line naming the culprit, exit code 2."""


def quiet_libraries() -> None:
    """HF's weight-loading bars and info logs would interleave across ranks and drown our own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def progress(total: int, desc: str):
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise a disabled bar (update() still works)."""
    from tqdm.auto import tqdm

    quiet = not dist.is_main() or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=False)


def say(message: str) -> None:
    if dist.is_main():
        print(message, flush=True)


def new_figure(n_panels: int = 1, width: float = 5.5, height: float = 4.0):
    """A matplotlib figure on the Agg backend (no display needed on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
    return fig, list(axes[0])


def save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path

