"""Check recipes without a GPU or a download: schema, batch table, filled DeepSpeed config, memory per GPU.

    python -m coconut_scale.check recipes/*.yaml [--world-sizes 1 8 16 32 64] [--gpu-memory-gb 80]

Exit code 1 when any recipe fails validation, a batch plan or DeepSpeed config cannot be built, or the
estimated memory of any (recipe, world size) exceeds the GPU memory; each failure says what to change.

The memory model (bytes per GPU; b = 2 for bf16/fp16, 4 for fp32; P = all parameters, P_t = trainable ones
(LoRA adapters, or P), W = world size, B = micro batch, T = data.max_seq_len, L = layers, h = hidden,
q/kv = query/key-value widths, I = MLP width, V = vocab, n = latent passes = c_thought*max_latent_stage + 1):

  weights      (P_frozen + P_t) * b, / W under ZeRO-3, 0 with parameter offload. A LoRA base is frozen in the
               model dtype (16-bit for the bf16 recipes) and never gets gradients or optimizer states.
  gradients    P_t * b (DeepSpeed accumulates in the model dtype), / W from ZeRO-2, 0 with optimizer offload.
  optimizer    P_t * (8 + 4): fp32 Adam m and v, plus the fp32 master copy when training in 16 bits;
               / W from ZeRO-1, 0 with optimizer offload (then it is host memory, reported separately).
  gathered     ZeRO-3's working set of all-gathered weights: min(P, stage3_max_live_parameters) * b. The
               configs keep up to 1e9 resident so the n latent passes do not re-gather each layer.
  activations  Coconut runs n base-model calls per step, but on consecutive column ranges of the sequence
               with the keys/values of earlier passes carried in a cache (coconut_scale/model/coconut.py), so the
               passes together cover T tokens once.
               With checkpointing: each layer keeps only its input, per pass, for that pass's tokens:
               (L + 1) * B*T*h*b in total (+1: the embeddings), plus one layer's full activations while it is
               recomputed in backward: B*T*b*(4h + 3q + 4kv + 4I) (norm inputs/outputs, q, rotated q,
               attention output, k, rotated k, v, the concatenated past keys, gate, up, act(gate), product),
               plus 2*B*heads*T*T*b for eager attention's scores and probabilities (sdpa/flash keep none).
               Without checkpointing: L full layers, plus every later pass re-materialising the concatenated
               past keys/values inside attention: 2*L*B*T*kv*b*(n - 1).
  kv_cache     the keys/values carried across passes: 2*L*B*T*kv*b.
  logits       B*T*V*(b + 12): the model-dtype logits, the fp32 log-softmax cross-entropy saves, and the fp32
               gradient and input gradient during backward (the fp32 upcast itself is transient). This is
               large for big vocabularies (Llama-3: 128k, Qwen3: 152k).
  buffers      DeepSpeed communication buckets: ZeRO-2/3: 2 * reduce_bucket_size * b (overlap_comm double
               buffer), + stage3_prefetch_bucket_size * b; ZeRO-0/1 with W > 1: min(5e8, P_t) * b.
  overhead     2.5 GiB: CUDA context, NCCL, cuBLAS workspaces, allocator fragmentation.

These are estimates (+-20%): they bound what the recipe needs, they do not replace a first real step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from coconut_scale.config.batch_plan import BatchMathError, batch_table, format_batch_table, resolve_batch
from coconut_scale.config.ds_config import DeepSpeedConfigError, build_ds_config, zero_settings
from coconut_scale.model.shapes import dims, lora_param_count, param_count, shape_for
from coconut_scale.config.recipe import RecipeError, check_files, load_recipe

GIB = 1024**3
OVERHEAD_GIB = 2.5
GPU_COMPONENTS = ("weights", "gradients", "optimizer", "gathered", "activations", "kv_cache", "logits", "buffers",
                  "overhead")
_SHORT = {"weights": "weights", "gradients": "grads", "optimizer": "optim", "gathered": "gathered",
          "activations": "activ", "kv_cache": "kv", "logits": "logits", "buffers": "buffers", "overhead": "overhead"}


def recipe_shape(recipe) -> dict:
    """HF config kwargs of the recipe's model, from from_config, the known shapes or a local config.json."""
    if recipe.model.from_config is not None:
        shape = dict(recipe.model.from_config)
        tok = recipe.model.tokenizer or ""
        if "vocab_size" not in shape and tok.startswith("train-bpe:"):
            shape["vocab_size"] = int(tok.split(":", 1)[1])  # the trainer sizes the model to that tokenizer
        return shape
    for candidate in (recipe.model.name_or_path, recipe.checkpoint.init_from):
        shape = shape_for(candidate) if candidate else None
        if shape:
            return shape
    raise LookupError(f"unknown architecture {recipe.model.name_or_path!r}: add its shape to "
                      f"coconut_scale/model/shapes.py SHAPES (config.json numbers) or point name_or_path to a local "
                      f"directory with a config.json")


def trainable_params(recipe, shape: dict) -> int:
    if recipe.lora.enabled:
        return lora_param_count(shape, recipe.lora.rank, recipe.lora_targets())
    return param_count(shape)


def estimate_memory(recipe, world_size: int, *, shape: dict | None = None, ds_config: dict | None = None) -> dict[str, float]:
    """GiB per GPU for each component of GPU_COMPONENTS, "total" (their sum) and "host_offload" (CPU RAM per
    rank for offloaded state, not in the total). See the module docstring for every formula."""
    shape = shape or recipe_shape(recipe)
    d = dims(shape)
    plan = resolve_batch(recipe.batch, world_size, recipe.data.max_seq_len)
    ds_config = ds_config or build_ds_config(recipe, plan, d.hidden, total_steps=1)
    z = zero_settings(ds_config)
    stage, W = z["stage"], world_size
    b = 4 if recipe.model.dtype == "fp32" else 2

    P = param_count(shape)
    P_t = trainable_params(recipe, shape)
    P_frozen = P if recipe.lora.enabled else 0
    opt_bytes = 8 + (4 if b < 4 else 0)

    weights = (P_frozen + P_t) * b / (W if stage == 3 else 1)
    gradients = P_t * b / (W if stage >= 2 else 1)
    optimizer = P_t * opt_bytes / (W if stage >= 1 else 1)
    host = 0.0
    if stage == 3 and z["offload_param"]:
        host += weights
        weights = 0.0
    if z["offload_optimizer"]:
        host += gradients + optimizer
        gradients = optimizer = 0.0
    in_model = P + (P_t if recipe.lora.enabled else 0)  # LoRA adds its adapters to the base
    gathered = min(in_model, z["max_live_parameters"]) * b if stage == 3 else 0.0

    B, T = plan.micro_batch_size, recipe.data.max_seq_len
    L, h, q, kv, I = d.layers, d.hidden, d.q_dim, d.kv_dim, d.intermediate
    n = recipe.coconut.max_passes
    layer_full = B * T * b * (4 * h + 3 * q + 4 * kv + 4 * I)
    if recipe.model.attn_implementation == "eager":
        layer_full += 2 * B * d.heads * T * T * b
    if recipe.model.gradient_checkpointing:
        activations = (L + 1) * B * T * h * b + layer_full
    else:
        activations = L * layer_full + 2 * L * B * T * kv * b * (n - 1)
    kv_cache = 2 * L * B * T * kv * b
    logits = B * T * d.vocab * (b + 12)

    if stage >= 2:
        buffers = 2 * z["reduce_bucket_size"] * b + (z["prefetch_bucket_size"] * b if stage == 3 else 0)
    else:
        buffers = min(5e8, P_t) * b if W > 1 else 0.0

    out = {
        "weights": weights, "gradients": gradients, "optimizer": optimizer, "gathered": gathered,
        "activations": activations, "kv_cache": kv_cache, "logits": logits, "buffers": buffers,
    }
    out = {k: v / GIB for k, v in out.items()}
    out["overhead"] = OVERHEAD_GIB
    out["total"] = sum(out[k] for k in GPU_COMPONENTS)
    out["host_offload"] = host / GIB
    return out


# --- what to change when it does not fit ---------------------------------------------------------------


def _variant(recipe, edit):
    r = recipe.model_copy(deep=True)
    edit(r)
    return r


def suggestions(recipe, world_size: int, limit_gb: float, shape: dict) -> list[str]:
    """Single changes that would bring the estimate under the limit, each with its estimate."""
    tries = []
    plan = resolve_batch(recipe.batch, world_size, recipe.data.max_seq_len)
    smaller = [m for m in range(plan.micro_batch_size - 1, 0, -1)
               if plan.global_batch_size % (m * world_size) == 0]
    for m in smaller:
        def edit(r, m=m):
            r.batch.micro_batch_per_world_size = {**r.batch.micro_batch_per_world_size, world_size: m}
        tries.append((f"batch.micro_batch_per_world_size.{world_size}={m} (smaller micro batch, more accumulation)", edit))
    if not recipe.model.gradient_checkpointing:
        tries.append(("model.gradient_checkpointing=true", lambda r: setattr(r.model, "gradient_checkpointing", True)))
    z = zero_settings(build_ds_config(recipe, plan, dims(shape).hidden, total_steps=1))
    precision = "fp32" if recipe.model.dtype == "fp32" else "bf16"
    if z["stage"] < 3:
        cfg = f"ds_configs/zero3_{precision}.json"
        tries.append((f"deepspeed.config={cfg} (ZeRO-3 shards weights too)", lambda r: setattr(r.deepspeed, "config", cfg)))
    if not z["offload_param"] and recipe.model.dtype == "bf16":
        cfg_off = "ds_configs/zero3_offload_bf16.json"
        tries.append((f"deepspeed.config={cfg_off} (CPU offload: slow, needs host RAM)",
                      lambda r: setattr(r.deepspeed, "config", cfg_off)))
    if not recipe.lora.enabled:
        tries.append(("lora.enabled=true (train adapters only)", lambda r: setattr(r.lora, "enabled", True)))
    out, micro_listed = [], False
    for label, edit in tries:
        try:
            est = estimate_memory(_variant(recipe, edit), world_size, shape=shape)["total"]
        except (ValueError, LookupError):
            continue
        if est <= limit_gb:
            if label.startswith("batch.") and micro_listed:
                continue  # only the largest micro batch that fits
            micro_listed = micro_listed or label.startswith("batch.")
            out.append(f"{label}: ~{est:.1f} GiB")
    return out


# --- report --------------------------------------------------------------------------------------------


def _count_records(path: str) -> int | None:
    p = Path(path)
    if not p.is_file():
        return None
    text = p.read_text()
    if p.suffix == ".jsonl":
        return sum(1 for line in text.splitlines() if line.strip())
    data = json.loads(text)
    return len(data) if isinstance(data, list) else None


def _total_steps(recipe) -> tuple[int, str]:
    """Optimizer steps of the whole run, for the LR schedule: from the training file when it is there."""
    epochs = recipe.optim.epochs - recipe.checkpoint.resume_from_epoch
    n = _count_records(recipe.data.train_file)
    if n is None:
        return 1000 * epochs, f"total_steps {1000 * epochs} is a placeholder ({recipe.data.train_file} absent)"
    steps = math.ceil(n / recipe.batch.global_batch_size) * epochs
    return steps, f"total_steps {steps} = ceil({n} records / {recipe.batch.global_batch_size}) x {epochs} epochs"


def _memory_table(rows: list[tuple[int, int, int, dict]], limit: float) -> str:
    header = ["GPUs", "micro", "accum", *(_SHORT[k] for k in GPU_COMPONENTS), "total", "host", f"fits {limit:g}"]
    lines = [header]
    for ws, micro, accum, est in rows:
        lines.append([str(ws), str(micro), str(accum), *(f"{est[k]:.1f}" for k in GPU_COMPONENTS),
                      f"{est['total']:.1f}", f"{est['host_offload']:.0f}", "yes" if est["total"] <= limit else "NO"])
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
    except LookupError as e:
        out(f"FAIL {e}")
        return [str(e)]
    d = dims(shape)
    P, P_t = param_count(shape), trainable_params(recipe, shape)
    limit = gpu_memory_gb if gpu_memory_gb is not None else recipe.gpu_memory_gb
    c = recipe.coconut
    passes = (f"{c.max_passes} forward passes per step (c_thought {c.c_thought} x max_latent_stage "
              f"{c.max_latent_stage} + 1)" if c.mode == "coconut" else f"mode {c.mode}: 1 forward pass per step")
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

    total_steps, steps_note = _total_steps(recipe)
    failures, rows = [], []
    for plan in plans:
        try:
            cfg = build_ds_config(recipe, plan, d.hidden, total_steps=total_steps)
        except DeepSpeedConfigError as e:
            out(f"FAIL {e}")
            failures.append(str(e))
            continue
        if show_ds_config:
            out(f"ds_config[world_size={plan.world_size}] = {json.dumps(cfg, sort_keys=True)}")
        rows.append((plan.world_size, plan.micro_batch_size, plan.grad_accum,
                     estimate_memory(recipe, plan.world_size, shape=shape, ds_config=cfg)))
    if show_ds_config and recipe.optim.scheduler != "constant":
        out(f"({steps_note})")
    if rows:
        out(f"memory per GPU, GiB (estimate; 'host' = CPU RAM per rank for offloaded state):")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", help="recipe YAML files")
    parser.add_argument("--world-sizes", nargs="+", type=int, default=None,
                        help="world sizes to check (default: each recipe's batch.world_sizes)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="GPU memory (default: the recipe's gpu_memory_gb)")
    parser.add_argument("--require-data", action="store_true", help="fail when a data file is missing")
    parser.add_argument("--no-ds-config", action="store_true", help="do not print the filled DeepSpeed configs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as for coconut_scale.train (repeatable), e.g. --set lora.enabled=true")
    args = parser.parse_args(argv)
    failed = []
    for path in args.recipes:
        problems = check_recipe(path, args.world_sizes, args.gpu_memory_gb, args.require_data, not args.no_ds_config,
                                args.overrides)
        if problems:
            failed.append(path)
        print()
    summary = f"{len(args.recipes) - len(failed)}/{len(args.recipes)} recipe(s) ok"
    print(summary + (f"; failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
