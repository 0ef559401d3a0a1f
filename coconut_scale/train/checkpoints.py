"""Resumable checkpoints that a crash can never leave looking valid: the one owner of the on-disk layout.

Layout under `<output_dir>/checkpoints/`:
    step-00000120/          complete checkpoint: DeepSpeed tag "ds" (shards), loop_state.json (TrainState),
                            rng_rank<r>.json (every RNG of rank r), the resolved recipe, the batch table
    step-00000120/ds_universal/   written by `coconut_scale.universal`, loadable at any world size
    .tmp-step-00000140/     a save in progress; ignored, removed by the next save
A checkpoint is written under its .tmp name by every rank, then renamed by rank 0 once all ranks are done.
The rename is atomic, so any `step-*` directory is complete; resume picks the highest.

The harness's own files are JSON, so reading them back can never run code. DeepSpeed's shards are its own
pickles: resume only checkpoints you trust, as with every PyTorch tool.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from coconut_scale import distributed as dist
from coconut_scale.atomic_files import write_json_atomic
from coconut_scale.errors import UserError

STEP_DIR = re.compile(r"^step-(\d{8})$")
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"  # written next to DS_TAG by coconut_scale.universal, for another world size
LOOP_STATE = "loop_state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def rng_state() -> dict:
    """Every RNG of this process as plain JSON values (python's, numpy's, torch's CPU and CUDA generators)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint; a missing or unreadable one is named."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint file {path} cannot be read: {e}") from None


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = max(int(keep_last), 1)

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, strategy, loop_state: dict, side_files: dict[str, str] | None = None) -> Path:
        """Collective: every rank must call it. Returns the final directory."""
        name = f"step-{int(loop_state['global_step']):08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if dist.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # same step saved twice (epoch end right after a periodic save)
                shutil.rmtree(final)
        dist.barrier()
        strategy.save_checkpoint(tmp, DS_TAG)
        write_json_atomic(tmp / f"rng_rank{dist.rank()}.json", rng_state())
        dist.barrier()
        if dist.is_main():
            write_json_atomic(tmp / LOOP_STATE, {**loop_state, "world_size": dist.world_size()})
            for filename, text in (side_files or {}).items():
                (tmp / filename).write_text(text)
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    @staticmethod
    def saved_world_size(path: Path) -> int | None:
        return read_json(Path(path) / LOOP_STATE).get("world_size")

    def needs_universal(self, path: Path, world_size: int) -> bool:
        """True when `path` was written at another world size; then its universal copy must exist."""
        saved = self.saved_world_size(path)
        if saved is None or saved == world_size:
            return False
        if not (path / UNIVERSAL_TAG).is_dir():
            raise UserError(
                f"checkpoint {path} was written by {saved} ranks and this run has {world_size}; ZeRO shards only "
                f"load at the world size that wrote them. Convert it once, then re-run this command: "
                f"python -m coconut_scale.universal {path}")
        return True

    def load(self, strategy, path: Path, universal: bool = False) -> dict:
        """The loop state of `path`, after loading weights, optimizer, schedule and this rank's RNG into place.
        `universal`: the world-size-free copy (the engine must be built with `"checkpoint": {"load_universal": true}`)."""
        strategy.load_checkpoint(path, UNIVERSAL_TAG if universal else DS_TAG)
        rng_file = path / f"rng_rank{dist.rank()}.json"
        if rng_file.exists():  # absent when resuming at another world size
            set_rng_state(read_json(rng_file))
        return read_json(path / LOOP_STATE)

    @staticmethod
    def step_dir_of(path: str | Path) -> Path:
        """A checkpoint named by the user: a step directory itself, or a run's (or checkpoints/) newest one."""
        path = Path(path)
        if STEP_DIR.match(path.name):
            if not (path / DS_TAG).is_dir():
                raise UserError(f"{path} has no DeepSpeed checkpoint ({DS_TAG}/); is it a coconut_scale checkpoint?")
            return path
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        latest = CheckpointManager(root).latest()
        if latest is None:
            raise UserError(f"no complete checkpoint (step-NNNNNNNN/) under {root}")
        return latest

    @staticmethod
    def write_universal(step_dir: Path, workers: int = 2) -> Path:
        """`step_dir/ds_universal`, written atomically (a crash leaves no half-converted copy that looks valid)."""
        from coconut_scale.train.strategy import convert_to_universal

        final, tmp = step_dir / UNIVERSAL_TAG, step_dir / f".tmp-{UNIVERSAL_TAG}"
        if final.is_dir():
            return final
        convert_to_universal(step_dir / DS_TAG, tmp, workers)
        os.rename(tmp, final)
        return final
