"""A run has one recipe: on resume, the recipe is compared with the one that wrote the checkpoint.

Every key counts as changing the math unless it is listed in OUTPUT_ONLY below (so a key added to the schema later
is guarded until someone decides otherwise). Any difference stops the run before weights load, listing each key
as `key: old -> new`. `checkpoint.allow_changes: [optim.lr, ...]` accepts the named keys (a section name accepts
every key under it); the trainer then applies them for real and records them (metrics.jsonl, kind
"recipe_change", and recipe_changes.json beside every later checkpoint).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from coconut_scale.config.recipe import RecipeError, recipe_from_dict
from coconut_scale.errors import UserError
from coconut_scale.train.checkpoints import read_json
from coconut_scale.train.versions import refuse_unknown

RECIPE_FILE = "recipe.resolved.yaml"
CHANGES_FILE = "recipe_changes.json"
# Keys that change what is written or when, never what is trained.
OUTPUT_ONLY = ("name", "output_dir", "gpus_assumed", "gpu_memory_gb", "data.test_file", "data.cache_dir",
               "data.eval_max_examples", "batch.eval_batch_size", "batch.world_sizes", "checkpoint.save_every_steps",
               "checkpoint.keep_last", "checkpoint.export_hf", "checkpoint.export_dtype", "checkpoint.auto_resume", "checkpoint.allow_changes",
               "checkpoint.on_signal", "distributed", "logging", "eval")
_ABSENT = "(absent)"


class RecipeChangeError(UserError):
    """The recipe differs from the checkpoint's in keys that change the math."""


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def allowed(recipe, key: str) -> bool:
    """Whether checkpoint.allow_changes names `key` or a section above it."""
    return _under(key, recipe.checkpoint.allow_changes)


def math_changes(old: dict, new: dict) -> dict[str, list]:
    """{dotted key: [old, new]} for every key outside OUTPUT_ONLY whose value differs."""
    a, b = _flat(old), _flat(new)
    return {k: [a.get(k, _ABSENT), b.get(k, _ABSENT)] for k in sorted(a.keys() | b.keys())
            if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not _under(k, OUTPUT_ONLY)}


def _read(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"checkpoint file {path} cannot be read: {e}") from None


def check_resume(recipe, checkpoint: Path) -> dict[str, list]:
    """The accepted changes ({key: [old, new]}, empty when the recipes agree); a RecipeChangeError listing every
    change that checkpoint.allow_changes does not name."""
    saved = _read(Path(checkpoint) / RECIPE_FILE)
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint file {Path(checkpoint) / RECIPE_FILE} is not a recipe mapping")
    try:  # keys added to the schema since the checkpoint was written count at their defaults
        saved = recipe_from_dict(saved, str(Path(checkpoint) / RECIPE_FILE)).resolved_dict()
    except RecipeError as e:
        # Keys a newer version added are refused as such; keys since renamed or removed are compared as written
        # (each shows as a change).
        unknown = [m.group(1) for line in e.problems if (m := re.match(r"unknown key '([^']+)'", line))]
        refuse_unknown(checkpoint, "recipe", [f"key {k}" for k in unknown])
    changes = math_changes(saved, recipe.resolved_dict())
    refused = {k: v for k, v in changes.items() if not _under(k, recipe.checkpoint.allow_changes)}
    if refused:
        listing = "; ".join(f"{k}: {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in refused.items())
        raise RecipeChangeError(
            f"recipe {recipe.source} differs from the one that wrote checkpoint {checkpoint} in {len(refused)} "
            f"key(s) that change the math: {listing}. Resume with that recipe ({Path(checkpoint) / RECIPE_FILE}), "
            f"start a new output_dir, or accept them with checkpoint.allow_changes: [{', '.join(refused)}]")
    return changes


def change_history(checkpoint: Path | None, changes: dict[str, list], global_step: int) -> list[dict]:
    """The checkpoint's recorded recipe changes plus this resume's (what recipe_changes.json holds)."""
    history = []
    if checkpoint is not None and (Path(checkpoint) / CHANGES_FILE).is_file():
        history = read_json(Path(checkpoint) / CHANGES_FILE)
    if changes:
        history.append({"resumed_from": str(checkpoint), "global_step": global_step, "changes": changes})
    return history
