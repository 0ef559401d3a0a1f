"""The DeepSpeed config of a run: a ds_configs/*.json template, filled from the recipe for one world size.

The templates ship inside the package (coconut_scale/ds_configs/); recipe.resolve_path finds
`ds_configs/NAME.json` in the cwd, the checkout or the package.

The JSON templates say "auto" wherever the value belongs to the recipe, so a number lives in exactly one
place. DeepSpeed itself does not understand "auto" (only the HF Trainer does), so build_ds_config fills every
one of them and refuses to return a config that still holds one.

Filled from the recipe ("auto" or absent in the JSON; an explicit value that disagrees is an error):
  train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps   <- the BatchPlan
  gradient_clipping            <- optim.grad_clip (always explicit: DeepSpeed's own default changed to 1.0)
  bf16.enabled, fp16.enabled   <- model.dtype
  optimizer                    <- AdamW with optim.lr / betas / eps / weight_decay
  zero_optimization.stage3_gather_16bit_weights_on_model_save <- checkpoint.export_hf (ZeRO-3)
Filled only where the JSON says "auto" (tuning, not contradiction), from the model's hidden size h, as the HF
integration does: reduce_bucket_size = h^2, stage3_prefetch_bucket_size = 0.9 h^2,
stage3_param_persistence_threshold = 10 h (parameters smaller than that, e.g. norms, are never partitioned).

There is no `scheduler` section: the trainer builds the LR schedule from optim.scheduler and optim.warmup_steps
(config/schedule.py), so one in the JSON is an error naming it rather than a second schedule that is ignored.

Every contradiction is collected and reported in a single DeepSpeedConfigError.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from coconut_scale.config.batch_plan import BatchPlan
from coconut_scale.config.recipe import resolve_path, search_roots
from coconut_scale.errors import UserError

AUTO = "auto"
_MISSING = object()


class DeepSpeedConfigError(UserError):
    pass


def ds_config_path(recipe) -> Path:
    path = resolve_path(recipe.deepspeed.config)
    if not path.is_file():
        roots = ", ".join(str(root) for root in search_roots())
        raise DeepSpeedConfigError(f"deepspeed.config = {recipe.deepspeed.config!r} does not exist (looked in {roots})")
    return path


def load_ds_json(path: str | Path) -> dict:
    """A template, with its top-level "_comment*" documentation keys dropped."""
    try:
        cfg = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise DeepSpeedConfigError(f"{path}: the top level must be a JSON object")
    return {k: v for k, v in cfg.items() if not k.startswith("_comment")}


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: override's values replace base's, mappings merge recursively, None deletes a key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


class _Filler:
    """Fills one config dict and records every contradiction with the recipe."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.mismatches: list[str] = []

    def _parent(self, path: tuple[str, ...]) -> dict | None:
        node = self.cfg
        for depth, key in enumerate(path[:-1]):
            if node.get(key, _MISSING) in (_MISSING, None, AUTO):
                node[key] = {}
            if not isinstance(node[key], dict):
                where = ".".join(path[: depth + 1])
                self.mismatches.append(f"{where} = {node[key]!r} in the ds config, but it must be a section to hold "
                                       f"{'.'.join(path)}")
                return None
            node = node[key]
        return node

    def recipe(self, path: tuple[str, ...], value, source: str) -> None:
        """Set when absent or "auto"; an explicit different value is a contradiction naming `source`."""
        node = self._parent(path)
        if node is None:
            return
        current = node.get(path[-1], _MISSING)
        if current is _MISSING or current == AUTO:
            node[path[-1]] = value
        elif not _same(current, value):
            self.mismatches.append(f"{'.'.join(path)} = {current!r} in the ds config, but {source} gives {value!r}")

    def tuning(self, path: tuple[str, ...], value, *, when_absent: bool = False) -> None:
        """Set where the JSON says "auto" (or, with when_absent, has nothing); explicit values are kept."""
        node = self._parent(path)
        if node is None:
            return
        current = node.get(path[-1], _MISSING)
        if current == AUTO or (when_absent and current is _MISSING):
            node[path[-1]] = value


def _leftover_autos(node, prefix: str = "") -> list[str]:
    if node == AUTO:
        return [prefix or "<top level>"]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leftover_autos(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leftover_autos(v, f"{prefix}[{i}]")]
    return []


def build_ds_config(recipe, plan: BatchPlan, hidden_size: int) -> dict:
    """The complete DeepSpeed config (no "auto" left) for `plan.world_size` GPUs."""
    path = ds_config_path(recipe)
    template = load_ds_json(path)
    cfg = deep_merge(template, recipe.deepspeed.overrides)
    f = _Filler(cfg)
    if "scheduler" in template:  # (recipe validation already refuses one in deepspeed.overrides)
        f.mismatches.append(f"scheduler is set in {path}, but the LR schedule is optim.scheduler and "
                            f"optim.warmup_steps (built by the trainer, not DeepSpeed): remove the section")
    ws = f"(world_size {plan.world_size})"
    f.recipe(("train_batch_size",), plan.global_batch_size, "batch.global_batch_size")
    f.recipe(("train_micro_batch_size_per_gpu",), plan.micro_batch_size, f"the batch plan {ws}")
    f.recipe(("gradient_accumulation_steps",), plan.grad_accum, f"the batch plan {ws}")
    f.recipe(("gradient_clipping",), float(recipe.optim.grad_clip), "optim.grad_clip")

    dtype = recipe.model.dtype
    f.recipe(("bf16", "enabled"), dtype == "bf16", f"model.dtype {dtype!r}")
    f.recipe(("fp16", "enabled"), dtype == "fp16", f"model.dtype {dtype!r}")

    o = recipe.optim
    f.recipe(("optimizer", "type"), "AdamW", "coconut_scale (always AdamW)")
    f.recipe(("optimizer", "params", "lr"), o.lr, "optim.lr")
    f.recipe(("optimizer", "params", "betas"), list(o.betas), "optim.betas")
    f.recipe(("optimizer", "params", "eps"), o.eps, "optim.eps")
    f.recipe(("optimizer", "params", "weight_decay"), o.weight_decay, "optim.weight_decay")

    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        f.mismatches.append(f"zero_optimization.stage = {stage!r}, must be 0, 1, 2 or 3")
    h = int(hidden_size)
    if stage in (1, 2, 3):
        f.tuning(("zero_optimization", "reduce_bucket_size"), h * h)
    if stage == 3:
        f.tuning(("zero_optimization", "stage3_prefetch_bucket_size"), int(0.9 * h * h))
        f.tuning(("zero_optimization", "stage3_param_persistence_threshold"), 10 * h)
        if recipe.checkpoint.export_hf:
            f.recipe(("zero_optimization", "stage3_gather_16bit_weights_on_model_save"), True,
                     "checkpoint.export_hf (a ZeRO-3 HF export needs the gathered 16-bit weights)")

    problems = list(f.mismatches)
    problems += [f"{p} is still \"auto\": coconut_scale fills only the fields listed in ds_config.py's docstring; "
                 f"give it an explicit value" for p in _leftover_autos(cfg)]
    if problems:
        raise DeepSpeedConfigError(
            f"DeepSpeed config {recipe.deepspeed.config} (+ deepspeed.overrides) does not fit recipe "
            f"{getattr(recipe, 'source', '<recipe>')} at world_size {plan.world_size}; {len(problems)} problem(s):\n  - "
            + "\n  - ".join(problems)
            + "\nSet these to \"auto\" in the JSON (the recipe then decides) or change the recipe."
        )
    assert not _leftover_autos(cfg)  # raw DeepSpeed would crash on one
    return cfg


def zero_settings(cfg: dict) -> dict:
    """The ZeRO facts the memory estimator needs from a filled config."""
    zero = cfg.get("zero_optimization") or {}
    return {
        "stage": int(zero.get("stage", 0)),
        "offload_param": (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme"),
        "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
        "max_live_parameters": int(zero.get("stage3_max_live_parameters", 1e9)),
        "reduce_bucket_size": int(zero.get("reduce_bucket_size", 5e8)),
        "prefetch_bucket_size": int(zero.get("stage3_prefetch_bucket_size", 5e7)),
        "sub_group_size": int(zero.get("sub_group_size", 1e9)),  # ZeRO-3 steps the optimizer this many at a time
    }
