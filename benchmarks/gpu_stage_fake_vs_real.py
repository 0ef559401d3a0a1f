"""GPU-kit stage `fake_vs_real`: a recipe's real peak memory on the lent GPU beside the fake-tensor figure of the
same step, so that `coconut-scale check --measure` (and its allowance for what fake tensors cannot see) is held to
a GPU whenever one is lent.

    stage_fake_vs_real(ctx) -> dict      ctx: {"smoke": bool, "cases": optional list of (recipe file, overrides, micro)}
    python benchmarks/gpu_stage_fake_vs_real.py [--smoke]      # the stage alone; prints its JSON

Per case, on one GPU (world size 1, accumulation 1), with the recipe's model built from its architecture's config
(random weights, nothing downloaded) by the trainer's own `train/engine.py`:
  1. one warm-up training step (forward, backward, optimizer: the optimizer states exist afterwards, as in every
     later step), then CUDA's peak statistics reset;
  2. one training step and one generation batch on the layouts `check --measure` uses (config/fake_model.py:
     rows of data.max_seq_len at the largest stage; batch.eval_batch_size prompts, eval.max_new_tokens new tokens);
  3. the fake-tensor measurement of the same recipe, micro batch and world size (config/measured_memory.py), read
     from benchmarks/results/fake_measure.json (made on the CPU) where it is there, so no device time goes to it.
Reported: the real peak allocated (tensors only: what fake tensors model, so the gap is allocator rounding plus
DeepSpeed's buffers), reserved (plus fragmentation) and reserved + the CUDA context (what the GPU lost: context,
NCCL, cuBLAS workspaces), each against the fake figure; and whether the fake figure plus the allowance of
`check --measure` (cli/check_measure.py ALLOWANCE_GIB) covers the real one.

Without CUDA (`smoke`) the case is a tiny recipe and the "real" run is the same step on real CPU tensors measured
by the same tracker, so the stage's code runs end to end in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30
# The two configurations of the first H200 run (docs/benchmarks.md), now with the recipes' own settings.
GPU_CASES = [("llama8b_gsm_lora.yaml", [], 8), ("qwen3_4b_gsm.yaml", [], 12)]
SMOKE_CASES = [("tiny_cpu_lora.yaml", ["lora.dropout=0.0"], 2)]


def one_gpu_recipe(recipe_file: str, overrides: list[str], micro: int):
    """The recipe at world size 1 and micro batch `micro` (accumulation 1), built from its architecture's config."""
    from coconut_scale.config.model_shape import recipe_shape
    from coconut_scale.config.recipe import load_recipe

    path = REPO / "recipes" / recipe_file
    shape = recipe_shape(load_recipe(path, overrides))
    return load_recipe(path, [*overrides, f"model.from_config={json.dumps(shape)}", "checkpoint.init_from=null",
                              "checkpoint.resume_from_epoch=0", f"batch.micro_batch_size={micro}",
                              f"batch.global_batch_size={micro}", "batch.micro_batch_per_world_size={}",
                              "batch.world_sizes=[1]"])


RESULTS = REPO / "benchmarks" / "results" / "fake_measure.json"


def _saved_measurement(recipe_file: str, micro: int):
    """The recipe's fake-tensor measurement from benchmarks/results/fake_measure.json (made on the CPU, carried
    with the tree: no device time is spent measuring), if it holds this micro batch."""
    from coconut_scale.config.measured_memory import RecipeMeasurement

    if not RESULTS.is_file():
        return None
    for entry in json.loads(RESULTS.read_text()).get("results", []):
        if entry.get("path") == f"recipes/{recipe_file}" and "measurement" in entry:
            m = RecipeMeasurement.from_json({**entry["measurement"], "points": {}})
            return m if micro in m.train else None
    return None


def fake_peak_gib(recipe, recipe_file: str | None = None) -> dict:
    """The fake-tensor peak per GPU of this recipe at world size 1 (its phase and split), with the estimate's
    figures for what fake tensors cannot see: the saved measurement where there is one, else measured here."""
    from coconut_scale.config.measured_memory import measure_recipe, world_size_rows

    micro = recipe.batch.micro_batch_size
    m = _saved_measurement(recipe_file, micro) if recipe_file else None
    source = "benchmarks/results/fake_measure.json" if m is not None else "measured now"
    if m is None:
        m = measure_recipe(recipe, [micro])
    row = world_size_rows(recipe, m, [1])[0]
    return {"peak_gib": row.measured_total, "phase": row.peak_phase, "region": row.peak_region,
            "split_gib": row.measured, "estimate_gib": row.estimate["total"], "estimate_phase": row.estimate["phase"],
            "buffers_gib": row.estimate["buffers"], "source": source, "measure_s": m.seconds}


def real_peak_cuda(recipe) -> dict:
    """Build the engine as the trainer does, warm up one step, then the real peak of a step, a validation batch
    and a generation batch."""
    import torch

    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.config.ds_config import build_ds_config
    from coconut_scale.config.fake_model import generation_batch, shape_tokenizer, training_batch
    from coconut_scale.config.model_shape import hidden_size
    from coconut_scale.config.model_spec import loss_weights
    from coconut_scale.train.engine import build_engine
    from coconut_scale.train.strategy import init_distributed

    init_distributed()
    plan = resolve_batch(recipe.batch, 1, recipe.data.max_seq_len)
    strategy = build_engine(recipe, build_ds_config(recipe, plan, hidden_size(recipe)), shape_tokenizer(recipe), 100,
                            log=lambda *a: print(*a, flush=True))
    engine, weights, device = strategy.engine, loss_weights(recipe), strategy.device
    inputs = training_batch(recipe, recipe.batch.micro_batch_size)
    batch = {k: v.to(device) for k, v in inputs["batch"].items()}
    parts = {n: {k: v.to(device) for k, v in p.items()} for n, p in (inputs["part_inputs"] or {}).items()} or None

    def step():
        out = engine(**batch, num_passes=inputs["num_passes"], latent_columns=inputs["latent_columns"],
                     part_inputs=parts)
        loss = out.loss + sum(weights[n] * t for n, t in (out.terms or {}).items())
        engine.backward(loss)
        engine.step()

    step()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    context = max(0, total - free - torch.cuda.memory_reserved())
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    step()
    gen = generation_batch(recipe)
    strategy.model.eval()
    with torch.no_grad():
        rows = training_batch(recipe, recipe.batch.eval_batch_size)  # validation: a forward with the loss
        engine(**{k: v.to(device) for k, v in rows["batch"].items()}, num_passes=rows["num_passes"],
               latent_columns=rows["latent_columns"])
        strategy.model.generate(gen["input_ids"].to(device), gen["attention_mask"].to(device),
                                max_new_tokens=gen["max_new_tokens"], position_ids=gen["position_ids"].to(device),
                                num_passes=gen["num_passes"], latent_columns=gen["latent_columns"], stop_at_eos=False)
    torch.cuda.synchronize()
    out = {"allocated_gib": torch.cuda.max_memory_allocated() / GIB, "reserved_gib": torch.cuda.max_memory_reserved() / GIB,
           "context_gib": context / GIB, "step_and_generation_s": time.time() - t0}
    out["reserved_plus_context_gib"] = out["reserved_gib"] + out["context_gib"]
    return out


def real_peak_cpu(recipe) -> dict:
    """The same step on real CPU tensors, measured by the tracker the fake run uses (no CUDA statistics here)."""
    from coconut_scale.config.fake_step import RecipeRun

    run = RecipeRun(recipe, fake=False)
    step = run.step(recipe.batch.micro_batch_size)
    gen, val = run.generation(), run.validation()
    peak = max(step.train.total, step.optimizer.total, gen.peak.total, val.peak.total) / GIB
    return {"allocated_gib": peak, "reserved_gib": None, "context_gib": None, "reserved_plus_context_gib": None}


def stage_fake_vs_real(ctx) -> dict:
    import torch

    from coconut_scale.cli.check_measure import ALLOWANCE_GIB

    cuda = torch.cuda.is_available() and not ctx.get("smoke")
    cases = ctx.get("cases") or (GPU_CASES if cuda else SMOKE_CASES)
    out = {"allowance_gib": ALLOWANCE_GIB, "cases": []}
    for recipe_file, overrides, micro in cases:
        recipe = one_gpu_recipe(recipe_file, list(overrides), micro)
        entry = {"recipe": recipe_file, "overrides": list(overrides), "micro_batch": micro}
        out["cases"].append(entry)
        entry["fake"] = fake_peak_gib(recipe, recipe_file if cuda else None)
        entry["real"] = real_peak_cuda(recipe) if cuda else real_peak_cpu(recipe)
        fake, real = entry["fake"]["peak_gib"], entry["real"]
        entry["allocated_over_fake"] = real["allocated_gib"] / fake
        if real["reserved_plus_context_gib"] is not None:
            # What the GPU held beyond the tensors fake tensors count, against what check --measure allows for it
            # (DeepSpeed's buffers as config/memory.py counts them, plus ALLOWANCE_GIB).
            allowed = entry["fake"]["buffers_gib"] + ALLOWANCE_GIB
            entry["unseen_gib"] = real["reserved_plus_context_gib"] - fake
            entry["allowed_unseen_gib"] = allowed
            entry["allowance_covers"] = fake + allowed >= real["reserved_plus_context_gib"]
        print(json.dumps(entry, indent=1), flush=True)
        if cuda:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            torch.cuda.empty_cache()
    size = lambda gib: f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"  # noqa: E731
    out["headline"] = "; ".join(
        f"{c['recipe']} micro {c['micro_batch']}: fake {size(c['fake']['peak_gib'])}, real allocated "
        f"{size(c['real']['allocated_gib'])}" + (f", reserved + context {size(c['real']['reserved_plus_context_gib'])} "
                                                 f"({'covered' if c['allowance_covers'] else 'NOT covered'} by fake + "
                                                 f"{size(c['allowed_unseen_gib'])})"
                                               if c['real']['reserved_plus_context_gib'] is not None else "")
        for c in out["cases"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU case even where CUDA is present")
    args = parser.parse_args(argv)
    print(json.dumps(stage_fake_vs_real({"smoke": args.smoke}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
