"""The recipe's `data.generate`: write a built-in data set's train/val files when they are missing.

    data:
      generate: {kind: prosqa_synthetic, n_train: 160, n_val: 60, seed: 0, n_concepts: 4, ...}

Every other key is an option of that kind's generator (for prosqa_synthetic: data.prosqa_synthetic.generate).
Both splits come from one call, so their questions are disjoint. No distributed code here: the trainer calls
this on rank 0 and then waits at a barrier.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from coconut_scale.config.recipe import RecipeError
from coconut_scale.data import prosqa_synthetic
from coconut_scale.data.records import write_records

KINDS = ("prosqa_synthetic",)
_SPLIT_KEYS = {"kind", "n_train", "n_val", "seed"}
# Keys of prosqa_synthetic.generate that generate_missing sets itself.
_NOT_OPTIONS = {"n", "seed", "exclude_questions"}


def generator_options() -> list[str]:
    """The options data.generate may pass through to the generator."""
    return [p for p in inspect.signature(prosqa_synthetic.generate).parameters if p not in _NOT_OPTIONS]


def _count(generate_cfg: dict, key: str, default: int, minimum: int) -> int:
    value = generate_cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecipeError(f"data.generate.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def generate_missing(generate_cfg: dict | None, train_file: str | Path, val_file: str | Path,
                     log: Callable[[str], None] = print) -> bool:
    """Write both splits when either file is missing; True when it wrote them. Nothing to do without a config."""
    if not generate_cfg or (Path(train_file).exists() and Path(val_file).exists()):
        return False
    kind = generate_cfg.get("kind", "prosqa_synthetic")
    if kind not in KINDS:
        raise RecipeError(f"data.generate.kind={kind!r}: only {', '.join(KINDS)} can be generated")
    allowed = generator_options()
    unknown = sorted(set(generate_cfg) - _SPLIT_KEYS - set(allowed))
    if unknown:
        raise RecipeError(f"data.generate.{unknown[0]}: not an option of {kind} (options: "
                          f"{', '.join(sorted(_SPLIT_KEYS | set(allowed)))})")
    options = {k: v for k, v in generate_cfg.items() if k not in _SPLIT_KEYS}
    sizes = {"train": _count(generate_cfg, "n_train", 2000, 1), "val": _count(generate_cfg, "n_val", 200, 1)}
    seed = _count(generate_cfg, "seed", 0, 0)
    try:
        splits = prosqa_synthetic.generate_splits(sizes, seed=seed, **options)
    except (ValueError, RuntimeError) as e:  # the generator's own checks (depths, n_concepts, ...)
        raise RecipeError(f"data.generate ({kind}): {e}") from None
    for path, split in ((train_file, "train"), (val_file, "val")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_records(splits[split], path)
        log(f"generated {sizes[split]} ProsQA-style records -> {path}")
    return True
