"""Resumable checkpoints that a crash can never leave looking valid, and HF-format exports.

Layout under `<output_dir>/checkpoints/`:
    step-00000120/          complete checkpoint (DeepSpeed tag "ds", loop_state.json, rng_rank*.pt, recipe)
    .tmp-step-00000140/     a save in progress; ignored, removed by the next save
A checkpoint is written under its .tmp name by every rank, then renamed by rank 0 once all ranks are done.
The rename is atomic, so any `step-*` directory is complete; resume picks the highest.

Exports (`<output_dir>/hf/<name>/`) are written the same way: consolidated 16-bit weights (gathered on
all ranks, written by rank 0), the tokenizer with the Coconut tokens, and coconut_config.json. LoRA runs
export the adapter merged into the base, plus the unmerged adapter in `<name>/adapter/` (see lora.py).
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

STEP_DIR = re.compile(r"^step-(\d{8})$")
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"  # coconut_scale.universal writes it next to DS_TAG, for another world size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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

    def save(self, engine, loop_state: dict, side_files: dict[str, str] | None = None) -> Path:
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
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
        dist.barrier()
        if dist.is_main():
            write_json_atomic(tmp / "loop_state.json", {**loop_state, "world_size": dist.world_size()})
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
        return json.loads((Path(path) / "loop_state.json").read_text()).get("world_size")

    def needs_universal(self, path: Path, world_size: int) -> bool:
        """True when `path` was written at another world size; then its universal copy must exist."""
        saved = self.saved_world_size(path)
        if saved is None or saved == world_size:
            return False
        if not (path / UNIVERSAL_TAG).is_dir():
            raise RuntimeError(
                f"checkpoint {path} was written by {saved} ranks and this run has {world_size}; ZeRO shards only "
                f"load at the world size that wrote them. Convert it once, then re-run this command:\n"
                f"  python -m coconut_scale.universal {path}")
        return True

    def load(self, engine, path: Path, universal: bool = False) -> dict:
        """`universal`: load the world-size-free copy (the engine must have been built with
        `"checkpoint": {"load_universal": true}`)."""
        load_path, _ = engine.load_checkpoint(
            str(path), tag=UNIVERSAL_TAG if universal else DS_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        rng_file = path / f"rng_rank{dist.rank()}.pt"
        if rng_file.exists():  # absent when resuming at another world size
            set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / "loop_state.json").read_text())


def consolidated_state_dict(engine) -> dict | None:
    """Full weights on rank 0 (None elsewhere); collective under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if dist.is_main() else None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if dist.is_main() else None


def export_hf(engine, tokenizer, out_dir: str | Path, coconut_meta: dict, to_base=None) -> Path | None:
    """Write an HF-format export of the engine's Coconut model. Collective; rank 0 writes.

    `to_base(state_dict) -> (model, state_dict)` turns the wrapper's state into an HF model to save
    (identity for full fine-tuning; merges adapters for LoRA). A `to_base` with a
    `write_extras(state_dict, directory, tokenizer)` method also gets the unmerged state to write beside
    the model (LoRA: the adapter in `<out_dir>/adapter/`).
    """
    out_dir = Path(out_dir)
    state = consolidated_state_dict(engine)
    if dist.is_main():
        prefix = "base_causallm."
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        base = engine.module.base_causallm
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_extras = getattr(to_base, "write_extras", None)
        if write_extras is not None:
            write_extras(state, tmp, tokenizer)
        if to_base is not None:
            base, state = to_base(state)
        base.save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / "coconut_config.json", coconut_meta)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    dist.barrier()
    return out_dir if dist.is_main() else None
