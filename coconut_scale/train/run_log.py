"""Run logging on rank 0: metrics.jsonl always, wandb when configured, tqdm bars only on a terminal."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from coconut_scale import distributed as dist


class RunLog:
    def __init__(self, output_dir: str | Path, wandb_project: str | None = None, run_name: str | None = None,
                 config: dict | None = None):
        self.main = dist.is_main()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb = None
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not sys.stderr.isatty():
            # transformers' own bars (e.g. "Writing model shards" on every export) would fill a batch job's log.
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if wandb_project and os.environ.get("WANDB_MODE", "online") != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow",
                                    dir=str(self.path.parent))

    def log(self, kind: str, **metrics) -> None:
        if not self.main:
            return
        record = {"kind": kind, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.wandb is not None:
            step = metrics.get("global_step")
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def print(self, message: str) -> None:
        if self.main:
            print(message, flush=True)

    def progress(self, total: int, desc: str, initial: int = 0):
        """A tqdm bar on rank 0 when stderr is a terminal; a no-op object otherwise."""
        from tqdm.auto import tqdm

        quiet = not self.main or not sys.stderr.isatty()
        return tqdm(total=total, desc=desc, initial=initial, disable=quiet, dynamic_ncols=True, leave=False)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
