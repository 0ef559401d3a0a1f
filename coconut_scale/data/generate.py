"""The recipe's `data.generate`: write a built-in data set's train/val file when it is missing.

    data:
      generate: {kind: prosqa_synthetic, n_train: 160, n_val: 60, seed: 0, n_concepts: 4, ...}

The section is validated with the recipe (config/recipe.py `ProsQASyntheticCfg`: every key, before any process
starts); here it is any object with `kind`, `n_train`, `n_val`, `seed` and `generator_options()`. A file that exists
is never written: when only one split is missing, only that one is generated, with none of the existing file's
questions, so a user's own training file stays as it is. Each split has its own derived seed
(prosqa_synthetic.generate_splits), so a missing split regenerated beside the other generated one is the split
a first run wrote. No distributed code here: the trainer calls this on rank 0 and then waits at a barrier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from coconut_scale.data import arithmetic_synthetic, prosqa_synthetic
from coconut_scale.data.records import load_records, write_records
from coconut_scale.errors import UserError

SPLITS = ("train", "val")  # the order generate_splits derives their seeds in
GENERATORS = {"prosqa_synthetic": (prosqa_synthetic, "ProsQA-style"),
              "arithmetic_synthetic": (arithmetic_synthetic, "arithmetic")}


class DataGenerationError(UserError):
    """`data.generate` settings the generator refuses (its own checks), named with the kind."""


def generate_missing(cfg, train_file: str | Path, val_file: str | Path, log: Callable[[str], None] = print) -> list[str]:
    """Write each split whose file is missing; returns the splits written (none without a config)."""
    if cfg is None:
        return []
    paths = {"train": Path(train_file), "val": Path(val_file)}
    missing = [split for split in SPLITS if not paths[split].exists()]
    if not missing:
        return []
    if cfg.kind not in GENERATORS:  # the recipe schema admits no other kind; a direct caller might
        raise DataGenerationError(f"data.generate.kind={cfg.kind!r}: only {sorted(GENERATORS)} can be generated")
    generator, label = GENERATORS[cfg.kind]
    sizes = {"train": cfg.n_train, "val": cfg.n_val}
    kept = [split for split in SPLITS if split not in missing]
    exclude = {r["question"] for split in kept for r in load_records(paths[split])}
    try:
        splits = generator.generate_splits(sizes, seed=cfg.seed, exclude_questions=exclude,
                                                  only=missing, **cfg.generator_options())
    except (ValueError, RuntimeError) as e:  # the generator's own checks (depths, n_concepts, ...)
        raise DataGenerationError(f"data.generate ({cfg.kind}): {e}") from None
    for split in missing:
        paths[split].parent.mkdir(parents=True, exist_ok=True)
        write_records(splits[split], paths[split])
        beside = (f" (kept the existing {kept[0]} file {paths[kept[0]]}; no question of it is reused)"
                  if kept else "")
        log(f"generated {sizes[split]} {label} records -> {paths[split]}{beside}")
    return missing
