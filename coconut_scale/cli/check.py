"""Check recipes without a GPU: schema, data files, LR schedule, batch table, filled DeepSpeed config, memory per GPU.

    coconut-scale check recipes/*.yaml [--world-sizes 1 8 16 32 64] [--gpu-memory-gb 80] [--set KEY=VALUE ...]
    coconut-scale check --measure recipes/X.yaml [--world-sizes ...]   (also executes the step on fake tensors)
    python -m coconut_scale.check ...   (the same)

Exit code 1 when any recipe fails validation, a batch plan or DeepSpeed config cannot be built, or the
estimated memory of any (recipe, world size) exceeds the GPU memory; each failure says what to change.
Exit code 2, with one `error:` line, for what stops every check: a recipe file that does not exist, an
override that names no recipe key, a data file with a bad record.

The training file's records are counted for the LR schedule's length (config/schedule.py); records longer
than data.max_seq_len are only dropped at training time, so the trainer may count a few steps fewer.
The memory model is in coconut_scale/config/memory.py: the peak per GPU over the step's phases (forward +
backward, the optimizer step, a validation and a generation batch), held to the measurement below within
measured_memory.TOLERANCE at every shipped recipe and world size. `--measure` executes the recipe's exact
training model at its real shape on fake tensors (no memory, no GPU: coconut_scale/config/measured_memory.py;
minutes per recipe on two cores) and prints, per world size, the measured peak by component beside the estimate,
DeepSpeed's model-state estimate and the FLOPs and predicted step time; it fails when the measured peak plus what
fake tensors cannot see (DeepSpeed's buffers, the allowance for the CUDA context and allocator) does not fit, or
when the estimate is outside its tolerance of the measurement (docs/memory.md). Models unknown to
coconut_scale/model/shapes.py are sized from their config through AutoConfig, which needs the hub cache or a
download.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from coconut_scale.cli.check_measure import measure_and_report
from coconut_scale.config.batch_plan import BatchMathError, batch_table, format_batch_table
from coconut_scale.config.ds_config import DeepSpeedConfigError, build_ds_config, ds_config_path
from coconut_scale.config.memory import GPU_COMPONENTS, estimate_memory, suggestions, trainable_params
from coconut_scale.config.model_shape import recipe_shape
from coconut_scale.config.recipe import RecipeError, apply_overrides, check_files, load_recipe
from coconut_scale.config.schedule import ScheduleError, describe_schedule
from coconut_scale.data.records import load_records
from coconut_scale.errors import run_cli
from coconut_scale.model.shapes import dims, param_count
from coconut_scale.train.strategy import validate_ds_config

_SHORT = {"weights": "weights", "gradients": "grads", "optimizer": "optim", "gathered": "gathered",
          "activations": "activ", "kv_cache": "kv", "logits": "logits", "buffers": "buffers", "overhead": "overhead"}


def _schedule_line(recipe) -> str:
    """The LR schedule that will train, from the training file's records when it is there."""
    data = recipe.data
    path = Path(data.train_file)
    if not path.is_file():
        source = "data.generate writes it at training time" if data.generate else "absent"
        return (f"LR schedule: {recipe.optim.scheduler}, warmup {recipe.optim.warmup_steps} step(s); its length "
                f"needs {data.train_file} ({source})")
    n = len(load_records(path))  # a bad record stops the check here, naming the file, record and field
    for other in (data.val_file, data.test_file):
        if other and Path(other).is_file():
            load_records(other)
    return (describe_schedule(recipe, n) + f" (records longer than data.max_seq_len {data.max_seq_len} are only "
            f"dropped at training time)")


def _memory_table(rows: list[tuple[int, int, int, dict]], limit: float) -> str:
    header = ["GPUs", "micro", "accum", *(_SHORT[k] for k in GPU_COMPONENTS), "total", "host", f"fits {limit:g}",
              "peak at"]
    lines = [header]
    for ws, micro, accum, est in rows:
        lines.append([str(ws), str(micro), str(accum), *(f"{est[k]:.1f}" for k in GPU_COMPONENTS),
                      f"{est['total']:.1f}", f"{est['host_offload']:.0f}", "yes" if est["total"] <= limit else "NO",
                      f"{est['phase']}: {est['moment']}"])
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def check_recipe(path: str, world_sizes: list[int] | None = None, gpu_memory_gb: float | None = None,
                 require_data: bool = False, show_ds_config: bool = True, overrides: list[str] = (),
                 out=print) -> list[str]:
    """Check one recipe, printing its report; returns the failures (empty: everything fits)."""
    out(f"=== {path}" + (f" with {' '.join(overrides)}" if overrides else ""))
    try:
        recipe = load_recipe(path, overrides)
        check_files(recipe, data=require_data)
    except RecipeError as e:
        out(f"FAIL {e}")
        return [str(e)]
    if not require_data:
        try:
            check_files(recipe, ds_config=False)
        except RecipeError as e:
            out(f"note: {e.problems[0]}" + (f" (+{len(e.problems) - 1} more)" if len(e.problems) > 1 else "")
                + "; fine for planning, training needs them")
    try:
        shape = recipe_shape(recipe)
        d = dims(shape)
        P, P_t = param_count(shape), trainable_params(recipe, shape)
    except ValueError as e:  # UnknownModelError, or an architecture whose layers model/shapes.py cannot lay out
        out(f"FAIL {e}")
        return [str(e)]
    limit = gpu_memory_gb if gpu_memory_gb is not None else recipe.gpu_memory_gb
    c = recipe.coconut
    passes = (f"{c.max_passes} forward passes per step (c_thought {c.c_thought} x max_latent_stage "
              f"{c.max_latent_stage} + 1)" if c.mode == "coconut" else f"mode {c.mode}: 1 forward pass per step")
    if recipe.method == "codi":
        passes = (f"method codi: {recipe.codi.num_latent + 1} student passes (num_latent {recipe.codi.num_latent} "
                  f"+ 1) and 1 teacher pass per step")
    training = f"LoRA r{recipe.lora.rank}: {P_t / 1e6:.1f}M trainable" if recipe.lora.enabled else "full fine-tune"
    size = f"{P / 1e9:.2f}B" if P >= 1e9 else f"{P / 1e6:.1f}M"
    out(f"{recipe.name}: {recipe.model.name_or_path} ({d.model_type}, {size} params, hidden {d.hidden}, "
        f"{d.layers} layers, vocab {d.vocab}) | {training} | {recipe.model.dtype} | {passes} | checkpointing "
        f"{'on' if recipe.model.gradient_checkpointing else 'off'} | seq {recipe.data.max_seq_len} | "
        f"written for {recipe.gpus_assumed} GPU(s)")

    try:
        plans = batch_table(recipe, world_sizes)
    except BatchMathError as e:
        out(f"FAIL {e}")
        return [str(e)]
    out(format_batch_table(plans))
    failures, rows = [], []
    try:
        out(_schedule_line(recipe))
    except ScheduleError as e:
        out(f"FAIL {e}")
        failures.append(str(e))

    for plan in plans:
        try:
            cfg = build_ds_config(recipe, plan, d.hidden)
            validate_ds_config(cfg, f"{ds_config_path(recipe)} (+ deepspeed.overrides) at world_size {plan.world_size}")
        except DeepSpeedConfigError as e:
            out(f"FAIL {e}")
            failures.append(str(e))
            continue
        if show_ds_config:
            out(f"ds_config[world_size={plan.world_size}] = {json.dumps(cfg, sort_keys=True)}")
        rows.append((plan.world_size, plan.micro_batch_size, plan.grad_accum,
                     estimate_memory(recipe, plan.world_size, shape=shape, ds_config=cfg)))
    if rows:
        out("memory per GPU, GiB (estimate at the peak of the step's phases; 'host' = CPU RAM per rank for offloaded "
            "state; the model and its moments: config/memory.py, docs/memory.md):")
        out(_memory_table(rows, limit))
    for ws, micro, _, est in rows:
        if est["total"] > limit:
            fixes = suggestions(recipe, ws, limit, shape)
            msg = (f"{recipe.name} at {ws} GPU(s): ~{est['total']:.1f} GiB per GPU > {limit:g} GiB "
                   f"(micro batch {micro}, {recipe.deepspeed.config}); ")
            msg += ("change one of: " + "; ".join(fixes)) if fixes else (
                "no single change fits: combine LoRA, ZeRO-3 offload and micro batch 1, or use GPUs with more memory")
            out(f"FAIL {msg}")
            failures.append(msg)
    out("ok" if not failures else f"{len(failures)} problem(s)")
    return failures


def quiet_accelerator_guess() -> None:
    """The check runs nothing on an accelerator; DeepSpeed, left to guess one on a machine without a GPU, warns
    "Setting accelerator to CPU" into the report. Told so up front, it says nothing (a set DS_ACCELERATOR wins)."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coconut-scale check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("recipes", nargs="+", help="recipe YAML files")
    parser.add_argument("--world-sizes", nargs="+", type=int, default=None,
                        help="world sizes to check (default: each recipe's batch.world_sizes)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="GPU memory (default: the recipe's gpu_memory_gb)")
    parser.add_argument("--require-data", action="store_true", help="fail when a data file is missing")
    parser.add_argument("--no-ds-config", action="store_true", help="do not print the filled DeepSpeed configs")
    parser.add_argument("--measure", action="store_true",
                        help="also execute each recipe's training step, optimizer step and a generation batch on fake "
                             "tensors at its real shape (minutes per recipe) and compare the estimate with it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as for coconut_scale.train (repeatable), e.g. --set lora.enabled=true")
    args = parser.parse_args(argv)
    quiet_accelerator_guess()
    # What would fail every recipe the same way is one error, before any report: missing files, bad overrides.
    missing = [p for p in args.recipes if not Path(p).is_file()]
    if missing:
        raise RecipeError(f"recipe file(s) {', '.join(missing)} do not exist (cwd {Path.cwd()})")
    apply_overrides({}, args.overrides, "--set")  # syntax and keys, against the schema
    failed = []
    for path in args.recipes:
        problems = check_recipe(path, args.world_sizes, args.gpu_memory_gb, args.require_data, not args.no_ds_config,
                                args.overrides)
        if args.measure and not problems:
            recipe = load_recipe(path, args.overrides)
            limit = args.gpu_memory_gb if args.gpu_memory_gb is not None else recipe.gpu_memory_gb
            problems = measure_and_report(recipe, args.world_sizes, limit, log=lambda line: print(line, flush=True))
        if problems:
            failed.append(path)
        print()
    summary = f"{len(args.recipes) - len(failed)}/{len(args.recipes)} recipe(s) ok"
    print(summary + (f"; failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
