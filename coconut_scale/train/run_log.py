"""Run logging on rank 0: metrics.jsonl always, wandb when configured; on a terminal a tqdm bar, otherwise (a batch
job's log file) one line per logged step, so a run is never silent for minutes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from coconut_scale import distributed as dist


HEARTBEAT_S = 60.0  # the longest a run's log (not a terminal) stays silent while training


class RunLog:
    def __init__(self, output_dir: str | Path, wandb_project: str | None = None, run_name: str | None = None,
                 config: dict | None = None):
        self.main = dist.is_main()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb = None
        self._wandb_args = (wandb_project, run_name, config)
        self._started = False
        self._last_line = time.monotonic()  # when the last line was printed (heartbeat)
        self._pace: tuple[int, float] | None = None  # (global step, time) the last heartbeat measured from
        if self.main and not sys.stderr.isatty():
            # transformers' own bars (e.g. "Writing model shards" on every export) would fill a batch job's log.
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

    def start(self) -> "RunLog":
        """Open the files (metrics.jsonl, wandb's run directory): once the run's setup succeeded, so that a refused
        run writes nothing into output_dir. Lines are printed before it; records are logged after it."""
        if not self.main or self._started:
            return self
        self._started = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        wandb_project, run_name, config = self._wandb_args
        if wandb_project and os.environ.get("WANDB_MODE", "online") != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow",
                                    dir=str(self.path.parent))
        return self

    def log(self, kind: str, **metrics) -> None:
        if not self.main:
            return
        self.start()
        record = {"kind": kind, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.wandb is not None:
            step = metrics.get("global_step")
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def print(self, message: str) -> None:
        if self.main:
            print(message, flush=True)
            self._last_line = time.monotonic()

    def progress(self, total: int, desc: str, initial: int = 0):
        """A tqdm bar on rank 0 when stderr is a terminal; a no-op object otherwise."""
        from tqdm.auto import tqdm

        quiet = not self.main or not sys.stderr.isatty()
        return tqdm(total=total, desc=desc, initial=initial, disable=quiet, dynamic_ncols=True, leave=False)

    def step_line(self, bar, record: dict, total_steps: int) -> None:
        """Show a logged train step: in the bar's postfix on a terminal, else as one printed line."""
        if not self.main:
            return
        if not bar.disable:
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            return
        print(f"step {record['global_step']}/{total_steps} epoch {record['epoch']} stage {record['stage']} "
              f"loss {record['loss']:.4f} lr {record['lr']:.3g} grad_norm {record['grad_norm']:.3g} "
              f"tokens/s {record['tokens_per_s']:.0f} peak_mem {record['peak_mem_gb']:.2f} GB", flush=True)
        self._last_line = time.monotonic()
        self._pace = (record["global_step"], self._last_line)

    def heartbeat(self, bar, global_step: int, total_steps: int, what: str) -> None:
        """Without a terminal, a line once HEARTBEAT_S passed since the last one: a slow machine never leaves the log
        silent for minutes between logged steps. Local to rank 0: no collective, nothing read from the device."""
        if not self.main or not bar.disable:
            return
        now = time.monotonic()
        if now - self._last_line < HEARTBEAT_S:
            return
        if self._pace is not None and global_step > self._pace[0]:
            per_step = (now - self._pace[1]) / (global_step - self._pace[0])
            pace = f", {per_step:.1f} s/step, ~{per_step * (total_steps - global_step) / 60:.0f} min of training left"
        else:
            pace = ""
        print(f"step {global_step}/{total_steps} {what}: training{pace}", flush=True)
        self._last_line, self._pace = now, (global_step, now)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def drop_torn_tail(path: Path) -> None:
    """A kill in the middle of an append leaves a last line without its newline. The resumed run would append after
    it, burying a line that is not JSON in the middle of the file; it is cut instead (its step is trained again)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def cpu_threads_note() -> str | None:
    """A line for a CPU run whose torch threads outnumber the idle cores: every op then waits at its barrier for
    the thread the scheduler set aside (benchmarks/bench_cpu_threads.py: one thread 6.5x faster than two at load 8
    on 2 cores). None on a GPU, with one thread, or on idle cores."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if torch.cuda.is_available() or threads < 2 or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load < cores - 0.5:
        return None
    return (f"note: {threads} torch threads on {cores} cores at load {load:.1f}: on busy cores each op waits for its "
            f"slowest thread; OMP_NUM_THREADS=1 runs such a machine several times faster")


def peak_memory_gb() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set's high-water mark."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
