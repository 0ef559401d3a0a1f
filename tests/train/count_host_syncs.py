"""Counts the host read-backs of each optimizer step of a real Trainer (run as a script by test_host_syncs.py).

Wraps the Tensor methods that copy a value to the host (`item`, `tolist`, `__bool__`, `__int__`, `__float__`)
and attributes each call to the first stack frame outside torch itself, then trains one stage-1 epoch (latent
passes, latent-safe checkpointing, ZeRO-3) and prints, as JSON, each optimizer step's calls by caller.

    DS_ACCELERATOR=cpu python tests/train/count_host_syncs.py OUTPUT_DIR DATA_DIR [override ...]
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TORCH_DIR = str(Path(torch.__file__).parent)
READ_BACKS = ("item", "tolist", "__bool__", "__int__", "__float__")


def caller() -> str:
    """`package/file.py:line` of the first frame outside torch."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    if frame is None:
        return "?"
    return package_path(frame.f_code.co_filename) + f":{frame.f_lineno}"


def package_path(filename: str, packages: dict[str, Path] | None = None) -> str:
    """`coconut_scale/data/sampler.py` for a file inside one of `packages` ({name: the package's folder}, by default
    where the named packages are imported from), else the file's name. A folder's name alone does not decide: a
    newcomer's clone is itself named coconut_scale, and its tests/ are not the package."""
    path = Path(filename).resolve()
    for name, folder in (PACKAGES if packages is None else packages).items():
        if path.is_relative_to(folder):
            return "/".join((name, *path.relative_to(folder).parts))
    return path.name


def _package_folders() -> dict[str, Path]:
    folders = {}
    for name in ("coconut_scale", "transformers", "deepspeed", "peft", "accelerate"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            folders[name] = Path(spec.origin).resolve().parent
    return folders


PACKAGES = _package_folders()


def main() -> None:
    from coconut_scale.config.recipe import load_recipe
    from coconut_scale.train.trainer import Trainer

    out, data, *extra = sys.argv[1:]
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [
        f"output_dir={out}", f"data.train_file={data}/train.json", f"data.val_file={data}/val.json",
        "data.generate={kind: prosqa_synthetic, n_train: 32, n_val: 4, seed: 3}", "logging.log_every_steps=1000",
        "checkpoint.save_every_steps=0", "coconut.max_latent_stage=2", *extra])
    trainer = Trainer(recipe).setup()
    trainer.strategy.train()

    calls: dict[int, Counter] = defaultdict(Counter)
    step = [1]  # the optimizer step under way: it ends when the guard has checked it (the loop's one sync)
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def counted(name):
        def read_back(self, *args, **kwargs):
            calls[step[0]][caller()] += 1
            return originals[name](self, *args, **kwargs)
        return read_back

    guard_check = trainer.guard.check

    def check_then_next_step(*args, **kwargs):
        try:
            return guard_check(*args, **kwargs)
        finally:
            step[0] += 1

    trainer.guard.check = check_then_next_step
    for name in READ_BACKS:
        setattr(torch.Tensor, name, counted(name))
    try:
        trainer.train_epoch(epoch=2, stage=2)  # stage 2: two latent passes per batch
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    # Step N+1's bucket holds what ran after the last step's guard: the epoch's closing log line.
    print(json.dumps({"steps": trainer.steps_per_epoch, "grad_accum": trainer.plan.grad_accum,
                      "calls": {k: dict(v) for k, v in sorted(calls.items())}}))


if __name__ == "__main__":
    main()
