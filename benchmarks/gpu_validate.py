"""Every GPU figure of coconut_scale in one prepared call: about 8 minutes on one H200, nothing downloaded.

    python benchmarks/gpu_validate.py --out DIR            # on the GPU machine (benchmarks/gpu_validate.sh)
    python benchmarks/gpu_validate.py --out DIR --smoke    # every stage on tiny shapes, on the CPU, < 1 minute
    python benchmarks/gpu_validate.py --out DIR --stages llama8b_lora profile   # rerun some stages only

Writes DIR/results.json (every figure, the tracebacks of failed stages), DIR/results.md (the tables) and
DIR/gpu_validate.log (the stages' output). Stages, each timed, each allowed to fail without stopping the rest:

  environment        GPU, torch, CUDA, transformers, deepspeed, peft versions; measured bf16 matmul TFLOP/s
  gpu_tests          pytest -m gpu tests/gpu (the smoke run only collects them)
  llama8b_lora       Llama-3.1-8B shape from its config, random init on the GPU, LoRA as
                     recipes/llama8b_gsm_lora.yaml with its own DeepSpeed config (ZeRO-0, bf16), stage-3 GSM-like
                     rows (c_thought 2: 6 latents), 512 tokens, checkpointing on; micro-batch sweep under an 80 GiB
                     cap: tokens/s, peak memory, MFU, share of step time in the latent passes (CUDA events)
  gpt2_fast_vs_reference  GPT-2-small full fine-tune step at stage 3, fast path vs reference (tokens/s), and
                     batched generation (KV cache) vs batch-1 reference generation without a cache
  memory_estimate    the memory estimator vs the measured peak: llama8b_lora's largest micro batch, and a
                     Qwen3-4B-shaped full fine-tune (ZeRO-3, one GPU, micro batch of recipes/qwen3_4b_gsm.yaml)
  fair_floor         a full fine-tune (Llama-3.1-8B widths, 8 layers, bf16, no ZeRO): Coconut's step vs the same body
                     and loss in one pass, and the latent passes' share, deferred weight gradients on and off
  profile            where a figure misses its target: torch.profiler's top kernels of one 8B step and the
                     time of every latent and full pass (in the smoke run: always, to keep the code alive)
  fake_vs_real       the real peak (allocated, reserved + CUDA context) of a step, a validation and a generation
                     batch beside `check --measure`'s fake-tensor figure of the same recipe and micro batch
                     (benchmarks/gpu_stage_fake_vs_real.py; the fake figures come from the committed
                     benchmarks/results/fake_measure.json): llama8b_gsm_lora micro 8, qwen3_4b_gsm micro 12

On CUDA each stage runs in its own process (an OOM, a hang or a crash costs that stage only; its time limit
is enforced by killing it); in the smoke run on the CPU they run in this process, except `environment`, which
keeps the subprocess path exercised.

A stage is one function decorated `@stage(limit_s=...)`: it takes a StageContext and returns its figures (a
JSON-able dict) with a one-line "headline" for the summary table and, optionally, a "markdown" section for
results.md; the registry `STAGES` keeps the stages in the order they are defined, which is the order they run.

MFU counts the FLOPs the step must do: the forward of every pass (the passes together cover the sequence
once), input gradients through every layer, weight gradients of trainable weights only (LoRA: the adapters),
attention's backward at twice its forward; the checkpointing recompute is not counted. The peak is the bf16
matmul rate measured in `environment`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from step_timing import Clock, _torch, matmul_tflops, on_cuda, step_flops, timed_steps  # noqa: E402 (this folder)

TARGETS = {"micro_batch": 8, "mfu": 0.45, "estimate_error": 0.15, "latent_share": 0.25}
GPU_CAP_GIB = 80.0
LOG_NAME, JSON_NAME, MD_NAME = "gpu_validate.log", "results.json", "results.md"


# --- the stage registry -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageContext:
    """What a stage is given: the run's kind and shapes, the figures of the stages before it, its deadline."""

    smoke: bool
    w: dict  # workloads(smoke)
    previous: dict  # stage name -> that stage's result, for the stages already run (or kept from results.json)
    deadline: float  # time.time() by which the stage must be done (an isolated child is killed then)


@dataclass(frozen=True)
class Stage:
    """One stage: `run(ctx)` returns its figures with "headline" (and "markdown", if any); "status" defaults to
    "ok". `limit_s`: the seconds it may take on one H200, its child process killed beyond them. The limits sum
    to more than the default --budget-s: the budget, not the limits, bounds a whole run."""

    name: str
    limit_s: float
    run: Callable[[StageContext], dict]


STAGES: dict[str, Stage] = {}


def stage(limit_s: float):
    """Register the decorated `stage_<name>` function as stage `<name>`, run after the stages defined before it."""

    def register(fn: Callable[[StageContext], dict]) -> Callable[[StageContext], dict]:
        name = fn.__name__.removeprefix("stage_")
        STAGES[name] = Stage(name, limit_s, fn)
        return fn

    return register


# --- shapes of the workloads ---------------------------------------------------------------------------------

def workloads(smoke: bool) -> dict:
    """Model shapes and sizes per stage: the real ones, or tiny ones that exercise the same code on the CPU."""
    from coconut_scale.model.shapes import SHAPES

    if not smoke:
        return dict(llama=SHAPES["llama-3.1-8b"], gpt2=SHAPES["gpt2"], qwen=SHAPES["qwen3-4b-2507"], seq=512,
                    micro_sweep=(4, 8, 16, 32, 64), gpt2_micro=32, gen_batch=64, gen_ref_rows=8, gen_new=32,
                    matmul_n=8192, steps=3, qwen_micro=None)
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, vocab_size=512)
    return dict(llama={**tiny, "model_type": "llama", "tie_word_embeddings": False},
                gpt2=dict(model_type="gpt2", vocab_size=512, n_positions=512, n_embd=64, n_layer=1, n_head=4,
                          bos_token_id=0, eos_token_id=0),
                qwen={**tiny, "model_type": "qwen3", "tie_word_embeddings": True}, seq=32,
                micro_sweep=(1, 2), gpt2_micro=2, gen_batch=4, gen_ref_rows=2, gen_new=4, matmul_n=256, steps=1,
                qwen_micro=2)


# --- small helpers ----------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_oom(exc: BaseException) -> bool:
    torch = _torch()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _gib(n_bytes: float) -> float:
    return n_bytes / 2**30


# --- batches -----------------------------------------------------------------------------------------------------

def gsm_like_batch(tokens, batch: int, seq: int, latents: int = 6, seed: int = 0) -> dict:
    """Stage-3 rows: question | <start> | 6 latents | <end> | remaining steps and answer (labelled), `seq` wide.

    Question lengths vary by up to 7 tokens; every row's answer is as long as the aligned layout allows, so the
    batch is exactly `seq` columns after the collator left-pads the rows to align their first latent.
    """
    from coconut_scale.testing import latent_batch

    base_q = max(2, seq // 4)
    answer_len = seq - base_q - latents - 3  # the columns after <end>, less the EOS
    if answer_len < 1:
        raise ValueError(f"seq {seq} too short for a question, {latents} latents and an answer")
    questions = [base_q - r % min(8, base_q - 1) for r in range(batch)]
    return latent_batch(tokens, [latents] * batch, questions, answer_len=answer_len, seed=seed,
                        vocab=range(tokens.start_id)).as_dict()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# --- engines -----------------------------------------------------------------------------------------------------

def _recipe(recipe_file: str, shape: dict, micro: int, seq: int, ds_json: str | None, extra: list[str] = ()):
    """The recipe at `shape`, one GPU, micro batch `micro`; `ds_json` None keeps the recipe's own DeepSpeed config."""
    from coconut_scale.config.recipe import load_recipe

    overrides = [
        f"model.from_config={json.dumps(shape)}", "checkpoint.init_from=null", "checkpoint.resume_from_epoch=0",
        *([f"deepspeed.config={ds_json}"] if ds_json else []), f"batch.micro_batch_size={micro}",
        f"batch.global_batch_size={micro}", "batch.micro_batch_per_world_size={}", "batch.world_sizes=[1]",
        f"data.max_seq_len={seq}", *extra,
    ]
    return load_recipe(REPO / "recipes" / recipe_file, overrides)


def _llama_lora_recipe(w: dict, micro: int, smoke: bool):
    """llama8b_gsm_lora as it trains (its ZeRO-0 bf16 config, which runs on the CPU too), dropout off."""
    return _recipe("llama8b_gsm_lora.yaml", w["llama"], micro, w["seq"], None,
                   ["lora.dropout=0.0", *(["lora.rank=4"] if smoke else [])])


def _ds_json(smoke: bool) -> str:
    # The bf16 ZeRO-3 config of the full fine-tuning recipes; fp32 in the smoke run, where CPU bf16 is only slower.
    return "ds_configs/zero3_fp32.json" if smoke else "ds_configs/zero3_bf16.json"


def _smoke_overrides(smoke: bool) -> list[str]:
    # Partition every parameter, as recipes/tiny_cpu.yaml does: ZeRO-3 keeps those under
    # stage3_param_persistence_threshold (10 x hidden, config/ds_config.py) whole on every rank.
    return ["model.dtype=fp32", "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}",
            "lora.rank=4"] if smoke else []


def build(recipe):
    """(bundle, tokens): the DeepSpeed engine of `recipe` in this process (one rank)."""
    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.config.ds_config import build_ds_config
    from coconut_scale.model.tokens import LatentTokens
    from coconut_scale.testing import tiny_tokenizer
    from coconut_scale.config.model_shape import hidden_size
    from coconut_scale.train.engine import build_engine
    from coconut_scale.train.strategy import init_distributed

    init_distributed()
    plan = resolve_batch(recipe.batch, 1, recipe.data.max_seq_len)
    ds_config = build_ds_config(recipe, plan, hidden_size(recipe))
    tokenizer = tiny_tokenizer()  # the shape's vocabulary is kept (its rows exceed the tokenizer's ids)
    bundle = build_engine(recipe, ds_config, tokenizer, 100, log=lambda *a: print(*a, flush=True))
    return bundle, LatentTokens.from_tokenizer(tokenizer)


def release(bundle) -> None:
    """Drop an engine and the global HF ZeRO-3 context, so the next stage in this process starts clean."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    bundle.engine.destroy() if hasattr(bundle.engine, "destroy") else None
    unset_hf_deepspeed_config()
    if on_cuda():
        _torch().cuda.empty_cache()


# --- stages ------------------------------------------------------------------------------------------------------

@stage(limit_s=40)
def stage_environment(ctx: StageContext) -> dict:
    torch = _torch()
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           **{name: _version(name) for name in ("transformers", "deepspeed", "peft", "pydantic", "liger-kernel",
                                                "flash-attn")}}
    if on_cuda():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=_gib(props.total_memory),
                   multiprocessors=props.multi_processor_count)
    else:
        out["gpu"] = None
    out["matmul_n"] = ctx.w["matmul_n"]
    out["bf16_matmul_tflops"] = matmul_tflops(ctx.w["matmul_n"])
    out["headline"] = (f"{out.get('gpu') or 'CPU'}; torch {out['torch']} (CUDA {out['cuda']}), transformers "
                       f"{out['transformers']}, deepspeed {out['deepspeed']}; bf16 matmul "
                       f"{out['bf16_matmul_tflops']:.1f} TFLOP/s")
    return out


@stage(limit_s=120)
def stage_gpu_tests(ctx: StageContext) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(REPO / "tests" / "gpu")]
    if ctx.smoke:
        cmd.append("--collect-only")
    limit = max(10, ctx.deadline - time.time() - 5)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
    print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)
    summary = next((line for line in reversed(proc.stdout.strip().splitlines()) if line.strip()), "")
    ok = proc.returncode == 0
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"returncode": proc.returncode, "summary": summary, "failed": failed, "collect_only": ctx.smoke,
            "status": "ok" if ok else "failed", "headline": summary}


@stage(limit_s=150)
def stage_llama8b_lora(ctx: StageContext) -> dict:
    torch = _torch()
    w, smoke = ctx.w, ctx.smoke
    cuda = on_cuda()
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, GPU_CAP_GIB * 2**30 / total))
    recipe = _llama_lora_recipe(w, max(w["micro_sweep"]), smoke)
    t0 = time.time()
    bundle, tokens = build(recipe)
    out = {"build_s": time.time() - t0, "cap_gib": GPU_CAP_GIB if cuda else None, "seq": w["seq"],
           "ds_config": recipe.deepspeed.config, "lora_rank": recipe.lora.rank, "sweep": []}
    context_bytes = 0
    if cuda:
        free, total = torch.cuda.mem_get_info()
        context_bytes = max(0, total - free - torch.cuda.memory_reserved())  # CUDA context, NCCL, cuBLAS
    peak_tflops = ctx.previous.get("environment", {}).get("bf16_matmul_tflops") or matmul_tflops(w["matmul_n"])
    device = bundle.engine.device
    for micro in w["micro_sweep"]:
        if time.time() > ctx.deadline - 20:
            out["sweep_stopped"] = f"time budget reached before micro batch {micro}"
            break
        entry = {"micro_batch": micro}
        out["sweep"].append(entry)
        try:
            batch = to_device(gsm_like_batch(tokens, micro, w["seq"]), device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            timed_steps(bundle, batch, tokens.latent_id, 1)  # warm-up: a new shape re-records ZeRO-3's trace
            t = timed_steps(bundle, batch, tokens.latent_id, w["steps"])
        except Exception as e:  # noqa: BLE001 - an OOM ends the sweep; anything else is recorded too
            entry["error"] = "out of memory" if _is_oom(e) else traceback.format_exc(limit=8)
            break
        n_tokens = int(batch["attention_mask"].sum())
        flops = step_flops(w["llama"], micro, batch["input_ids"].shape[1], recipe.lora.rank, recipe.lora_targets())
        entry.update(t, tokens_per_s=n_tokens / (t["step_ms"] / 1e3), mfu=flops / (t["step_ms"] / 1e3) / 1e12 / peak_tflops,
                     model_tflops_per_s=flops / (t["step_ms"] / 1e3) / 1e12)
        if cuda:
            entry.update(peak_allocated_gib=_gib(torch.cuda.max_memory_allocated()),
                         peak_reserved_gib=_gib(torch.cuda.max_memory_reserved()),
                         measured_gib=_gib(torch.cuda.max_memory_reserved() + context_bytes))
    fitted = [e for e in out["sweep"] if "error" not in e]
    if fitted:
        best = fitted[-1]
        out.update(best_micro_batch=best["micro_batch"], tokens_per_s=best["tokens_per_s"], mfu=best["mfu"],
                   latent_share=best["latent_share"], peak_gib=best.get("measured_gib"))
    out["context_gib"] = _gib(context_bytes)
    release(bundle)
    out["headline"] = (f"largest micro batch {out.get('best_micro_batch')}: {_fmt(out.get('tokens_per_s'), '{:.0f}')} "
                       f"tokens/s, MFU {_fmt(out.get('mfu'), '{:.1%}')}, latent passes "
                       f"{_fmt(out.get('latent_share'), '{:.1%}')} of the step, peak {_fmt(out.get('peak_gib'), '{:.1f}')} GiB")
    out["markdown"] = sweep_table(out["sweep"]) if out["sweep"] else None
    return out


def sweep_table(sweep: list[dict]) -> str:
    lines = ["Micro-batch sweep (llama8b_lora):", "",
             "| micro | tokens/s | step ms | MFU | latent share | peak GiB | note |", "|---|---|---|---|---|---|---|"]
    for e in sweep:
        lines.append(f"| {e['micro_batch']} | {_fmt(e.get('tokens_per_s'), '{:.0f}')} | {_fmt(e.get('step_ms'), '{:.0f}')} "
                     f"| {_fmt(e.get('mfu'), '{:.1%}')} | {_fmt(e.get('latent_share'), '{:.1%}')} "
                     f"| {_fmt(e.get('measured_gib'), '{:.1f}')} | {_last_line(e.get('error'))} |")
    return "\n".join(lines)


@stage(limit_s=60)
def stage_gpt2_fast_vs_reference(ctx: StageContext) -> dict:
    """Plain PyTorch (the comparison is of the two implementations, not of DeepSpeed): bf16 on CUDA, fused AdamW."""
    torch = _torch()
    from transformers import AutoModelForCausalLM

    from coconut_scale.model.coconut import Coconut
    from coconut_scale.model.reference import reference_forward, reference_generate
    from coconut_scale.model.shapes import hf_config
    from coconut_scale.model.tokens import LatentTokens
    from coconut_scale.testing import tiny_tokenizer

    w, cuda = ctx.w, on_cuda()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tokens = LatentTokens.from_tokenizer(tiny_tokenizer())
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(hf_config(w["gpt2"]), dtype=dtype, attn_implementation="sdpa").to(device)
    model = Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda or None)
    batch = to_device(gsm_like_batch(tokens, w["gpt2_micro"], w["seq"]), device)
    clock = Clock()

    def fast():
        return model(**batch).loss

    def reference():
        return reference_forward(base, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 batch["position_ids"], tokens.latent_id)[0]

    out = {"micro_batch": w["gpt2_micro"], "seq": w["seq"], "dtype": str(dtype)}
    n_tokens = int(batch["attention_mask"].sum())
    for name, loss_fn in (("fast", fast), ("reference", reference)):
        times = []
        for step in range(1 + w["steps"]):
            start = clock.now()
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = clock.now()
            clock.sync()
            if step:  # the first is warm-up
                times.append(clock.ms(start, end))
        out[f"train_{name}_tokens_per_s"] = n_tokens / (sorted(times)[len(times) // 2] / 1e3)
    out["train_speedup"] = out["train_fast_tokens_per_s"] / out["train_reference_tokens_per_s"]

    model.eval()
    model.eos_token_id = -1  # never stop early: both sides generate exactly gen_new tokens per row
    prompts = gsm_like_batch(tokens, w["gen_batch"], max(24, w["seq"] // 4))["input_ids"]
    end_col = int((prompts[0] == tokens.end_id).nonzero()[0])
    # question | <start> | latents | <end>, the <end> in one column; the shorter questions' left padding is
    # generated over without a mask (a throughput figure: both sides see the same prompts)
    prompts = prompts[:, : end_col + 1].to(device)
    new = w["gen_new"]
    model.generate(prompts[:2], max_new_tokens=2)
    clock.sync()
    start = clock.now()
    model.generate(prompts, max_new_tokens=new)
    end = clock.now()
    clock.sync()
    out["generate_batched_tokens_per_s"] = prompts.shape[0] * new / (clock.ms(start, end) / 1e3)
    rows = prompts[: w["gen_ref_rows"]]
    start = clock.now()
    for row in rows:
        reference_generate(base, row[None], tokens.latent_id, eos_id=-1, max_new_tokens=new)
    end = clock.now()
    clock.sync()
    out["generate_reference_tokens_per_s"] = rows.shape[0] * new / (clock.ms(start, end) / 1e3)
    out["generate_speedup"] = out["generate_batched_tokens_per_s"] / out["generate_reference_tokens_per_s"]
    out.update(gen_batch=w["gen_batch"], gen_reference_rows=w["gen_ref_rows"], gen_new_tokens=new)
    out["headline"] = (f"train {out['train_fast_tokens_per_s']:.0f} vs {out['train_reference_tokens_per_s']:.0f} "
                       f"tokens/s ({out['train_speedup']:.2f}x); generate {out['generate_batched_tokens_per_s']:.0f} vs "
                       f"{out['generate_reference_tokens_per_s']:.0f} tokens/s ({out['generate_speedup']:.1f}x)")
    return out


def _estimator():
    try:
        from coconut_scale.config.memory import estimate_memory
    except ImportError:
        from coconut_scale.cli.check import estimate_memory
    return estimate_memory


def _compare(estimate_gib: float, measured_gib: float | None) -> dict:
    if not measured_gib:
        return {"estimate_gib": estimate_gib, "measured_gib": None, "error": None, "within": None}
    error = estimate_gib / measured_gib - 1
    return {"estimate_gib": estimate_gib, "measured_gib": measured_gib, "error": error,
            "within": abs(error) <= TARGETS["estimate_error"]}


@stage(limit_s=150)
def stage_memory_estimate(ctx: StageContext) -> dict:
    torch = _torch()
    w, smoke, cuda = ctx.w, ctx.smoke, on_cuda()
    estimate = _estimator()
    out = {}
    llama = ctx.previous.get("llama8b_lora", {})
    micro = llama.get("best_micro_batch")
    if micro:
        recipe = _llama_lora_recipe(w, micro, smoke)
        out["llama8b_lora"] = {"micro_batch": micro, **_compare(estimate(recipe, 1)["total"], llama.get("peak_gib"))}
    else:
        out["llama8b_lora"] = {"skipped": "llama8b_lora measured no micro batch"}

    from coconut_scale.config.recipe import load_recipe

    qwen_micro = w["qwen_micro"] or load_recipe(REPO / "recipes" / "qwen3_4b_gsm.yaml").batch.micro_batch_size
    recipe = _recipe("qwen3_4b_gsm.yaml", w["qwen"], qwen_micro, w["seq"], _ds_json(smoke), _smoke_overrides(smoke))
    est = estimate(recipe, 1)["total"]
    t0 = time.time()
    bundle, tokens = build(recipe)
    print(f"  qwen3_4b_full built in {time.time() - t0:.0f} s", flush=True)
    context_bytes = 0
    if cuda:
        free, total = torch.cuda.mem_get_info()
        context_bytes = max(0, total - free - torch.cuda.memory_reserved())
        torch.cuda.reset_peak_memory_stats()
    batch = to_device(gsm_like_batch(tokens, qwen_micro, w["seq"]), bundle.engine.device)
    t = timed_steps(bundle, batch, tokens.latent_id, 2 if cuda else 1)
    measured = _gib(torch.cuda.max_memory_reserved() + context_bytes) if cuda else None
    out["qwen3_4b_full"] = {"micro_batch": qwen_micro, "build_s": time.time() - t0, "step_ms": t["step_ms"],
                            **_compare(est, measured)}
    release(bundle)
    out["headline"] = "; ".join(
        f"{key}: estimate {_fmt(out[key].get('estimate_gib'), '{:.1f}')} vs measured "
        f"{_fmt(out[key].get('measured_gib'), '{:.1f}')} GiB ({_fmt(out[key].get('error'), '{:+.0%}')})"
        for key in ("llama8b_lora", "qwen3_4b_full"))
    return out


@stage(limit_s=45)
def stage_fair_floor(ctx: StageContext) -> dict:
    """A full fine-tune's Coconut step vs its fair floor (the same body and loss on the same tokens, one pass), and
    the latent passes' share of the step, with the deferred weight gradients (model/deferred_grad.py) and without.

    Plain PyTorch, one GPU, bf16, latent-safe checkpointing: Llama-3.1-8B's widths at 8 layers (2.8B parameters:
    weights and gradients fit without ZeRO, which would turn the deferral off), micro 16 x 512, 6 latents. Forward
    and backward only: the optimizer step is the same for every variant. Variants interleaved, medians.
    """
    torch = _torch()
    import statistics

    from transformers import AutoModelForCausalLM

    from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
    from coconut_scale.model.coconut import Coconut, plan_passes
    from coconut_scale.model.shapes import hf_config
    from coconut_scale.model.tokens import LatentTokens
    from coconut_scale.testing import tiny_tokenizer
    from step_timing import PassTimer

    w, cuda = ctx.w, on_cuda()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = {**w["llama"], "num_hidden_layers": 1 if ctx.smoke else 8}
    micro = 2 if ctx.smoke else 16
    tokens = LatentTokens.from_tokenizer(tiny_tokenizer())
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype, attn_implementation="sdpa").train()
    enable_latent_safe_checkpointing(base)
    ids = dict(latent_token_id=tokens.latent_id, start_latent_id=tokens.start_id, end_latent_id=tokens.end_id, eos_token_id=-1)
    per_pass = Coconut(base, **ids)
    per_pass.defer_weight_grads = False
    wrappers = {"floor": Coconut(base, feedback=False, **ids), "coconut": Coconut(base, **ids), "coconut_per_pass": per_pass}
    batch = to_device(gsm_like_batch(tokens, micro, w["seq"]), device)
    plan = plan_passes(batch["input_ids"].cpu(), tokens.latent_id)
    latent = [i for i, ((a, b), fill) in enumerate(zip(plan.ranges, plan.fills)) if fill and b - a == 1]
    clock = Clock()
    times = {name: [] for name in wrappers}
    shares = {}
    for rnd in range(1 + (1 if ctx.smoke else 4)):
        for name in wrappers if rnd % 2 == 0 else reversed(list(wrappers)):
            timer = PassTimer(base.get_decoder(), clock) if name != "floor" else None
            base.zero_grad(set_to_none=True)
            start = clock.now()
            loss = wrappers[name](**batch).loss
            bwd_start = clock.now()
            loss.backward()
            end = clock.now()
            clock.sync()
            if timer is not None:
                fwd, bwd = timer.per_pass_ms(bwd_start, end)
                timer.remove()
                shares.setdefault(name, []).append(sum(fwd[i] + bwd[i] for i in latent) / clock.ms(start, end))
            if rnd:  # the first round is warm-up
                times[name].append(clock.ms(start, end))
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {"shape_layers": shape["num_hidden_layers"], "micro_batch": micro, "seq": w["seq"], "dtype": str(dtype),
           "latent_passes": latent, "step_ms": med, "times_ms": times,
           "x_floor": {name: med[name] / med["floor"] for name in med},
           "latent_share": statistics.median(shares["coconut"]),
           "latent_share_per_pass": statistics.median(shares["coconut_per_pass"]),
           "note": "with the deferral, the one weight-gradient matmul over all latent passes' rows runs in the first "
                   "pass's backward, so latent_share leaves it out; x_floor counts everything"}
    del base, wrappers
    if cuda:
        torch.cuda.empty_cache()
    out["headline"] = (f"coconut {out['x_floor']['coconut']:.3f}x the floor (per-pass gradients "
                       f"{out['x_floor']['coconut_per_pass']:.3f}x); latent passes {out['latent_share']:.1%} of the "
                       f"step ({out['latent_share_per_pass']:.1%} per-pass; target < {TARGETS['latent_share']:.0%})")
    return out


def missed_targets(previous: dict) -> list[str]:
    """The figures that miss their targets (or could not be measured)."""
    llama = previous.get("llama8b_lora", {})
    memory = previous.get("memory_estimate", {})
    misses = []
    if (llama.get("best_micro_batch") or 0) < TARGETS["micro_batch"]:
        misses.append(f"micro batch {llama.get('best_micro_batch')} < {TARGETS['micro_batch']} within {GPU_CAP_GIB:g} GiB")
    if llama.get("mfu") is None or llama["mfu"] < TARGETS["mfu"]:
        misses.append(f"MFU {_fmt(llama.get('mfu'), '{:.1%}')} < {TARGETS['mfu']:.0%}")
    if llama.get("latent_share") is None or llama["latent_share"] >= TARGETS["latent_share"]:
        misses.append(f"latent passes {_fmt(llama.get('latent_share'), '{:.1%}')} >= {TARGETS['latent_share']:.0%} of the step")
    for name in ("llama8b_lora", "qwen3_4b_full"):
        if (memory.get(name) or {}).get("within") is not True:
            misses.append(f"memory estimate of {name} not within {TARGETS['estimate_error']:.0%}")
    return misses


@stage(limit_s=80)
def stage_profile(ctx: StageContext) -> dict:
    torch = _torch()
    from torch.profiler import ProfilerActivity, profile

    w, smoke, cuda = ctx.w, ctx.smoke, on_cuda()
    misses = missed_targets(ctx.previous)
    if not misses and not smoke:
        return {"status": "skipped", "reason": "every target met", "headline": "every target met"}
    micro = ctx.previous.get("llama8b_lora", {}).get("best_micro_batch") or w["micro_sweep"][0]
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, GPU_CAP_GIB * 2**30 / total))
    recipe = _llama_lora_recipe(w, micro, smoke)
    bundle, tokens = build(recipe)
    batch = to_device(gsm_like_batch(tokens, micro, w["seq"]), bundle.engine.device)
    timed_steps(bundle, batch, tokens.latent_id, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = timed_steps(bundle, batch, tokens.latent_id, 1, label_passes=True)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    averages = prof.key_averages()
    kernels = averages.table(sort_by=sort, row_limit=15)
    passes = [f"| {i} | {a}-{b} | {'latent' if i in t['latent_passes'] else 'full'} | {f:.2f} | {bw:.2f} |"
              for i, ((a, b), f, bw) in enumerate(zip(t["pass_ranges"], t["pass_forward_ms"], t["pass_backward_ms"]))]
    release(bundle)
    pass_table = "\n".join(["| pass | columns | kind | forward ms | backward ms |", "|---|---|---|---|---|", *passes])
    return {"misses": misses, "micro_batch": micro, "step_ms": t["step_ms"], "latent_share": t["latent_share"],
            "kernel_table": kernels, "pass_table": pass_table,
            "headline": "misses: " + "; ".join(misses) if misses else "",
            "markdown": "\n".join(["Profile of one 8B step (top kernels):", "", "```", kernels.rstrip(), "```", "",
                                   pass_table])}


@stage(limit_s=300)
def stage_fake_vs_real(ctx: StageContext) -> dict:
    """The real peak of a recipe's step, validation and generation batches on the GPU beside the fake-tensor figure
    of `coconut-scale check --measure` (benchmarks/gpu_stage_fake_vs_real.py): Llama-3.1-8B LoRA at micro 8 and
    Qwen3-4B full fine-tuning at micro 12, one GPU; on the CPU (smoke) a tiny recipe on real CPU tensors."""
    from gpu_stage_fake_vs_real import stage_fake_vs_real as run

    return run({"smoke": ctx.smoke})


# --- running stages ----------------------------------------------------------------------------------------------

def run_stage_here(name: str, smoke: bool, previous: dict, deadline: float) -> dict:
    """One stage in this process: its figures, or status "error" with the traceback; always timed."""
    t0 = time.time()
    ctx = StageContext(smoke=smoke, w=workloads(smoke), previous=previous, deadline=deadline)
    try:
        result = STAGES[name].run(ctx)
        result.setdefault("status", "ok")
    except Exception:  # noqa: BLE001 - a stage may fail; the others still run
        trace = traceback.format_exc()
        result = {"status": "error", "traceback": trace, "headline": _last_line(trace)}
    result["seconds"] = time.time() - t0
    return result


def run_stage_isolated(name: str, smoke: bool, previous: dict, limit_s: float, log) -> dict:
    """One stage in a child process, killed after `limit_s`; its figures come back through a JSON file."""
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        prev_file, result_file = Path(tmp) / "previous.json", Path(tmp) / "result.json"
        prev_file.write_text(json.dumps(previous))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--previous", str(prev_file),
               "--result", str(result_file), "--deadline", str(t0 + limit_s)] + (["--smoke"] if smoke else [])
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=limit_s)
            output, why = proc.stdout, f"exited with code {proc.returncode} without a result"
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            why = f"killed after its {limit_s:.0f} s limit"
        log.write(output)
        if result_file.is_file():
            return json.loads(result_file.read_text())
    return {"status": "error", "reason": why, "headline": why, "output_tail": output[-3000:], "seconds": time.time() - t0}


# --- report ------------------------------------------------------------------------------------------------------

def _fmt(value, pattern="{:.3g}") -> str:
    return "-" if value is None else pattern.format(value)


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def render_markdown(results: dict) -> str:
    lines = [f"# GPU validation ({'smoke, CPU' if results['smoke'] else 'GPU'}), {results['started']}", "",
             f"Command: `{results['command']}`; total {results['seconds']:.0f} s.", "",
             "| stage | status | seconds | figures |", "|---|---|---|---|"]
    ran = [(name, results["stages"][name]) for name in STAGES if name in results["stages"]]
    for name, r in ran:
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', 0):.1f} | {r.get('headline', '').replace('|', '/')} |")
    for _, r in ran:
        if r.get("markdown"):
            lines += ["", r["markdown"]]
    lines += ["", f"Targets: micro batch >= {TARGETS['micro_batch']} within {GPU_CAP_GIB:g} GiB, MFU >= "
              f"{TARGETS['mfu']:.0%}, estimate within {TARGETS['estimate_error']:.0%}, latent passes < "
              f"{TARGETS['latent_share']:.0%} of the step. Missed: "
              + ("; ".join(missed_targets(results["stages"])) or "none")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for results.json, results.md, gpu_validate.log")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, every stage, < 1 minute")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock limit of the whole run")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--previous", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from coconut_scale.atomic_files import write_json_atomic, write_text_atomic

    if args.child:
        previous = json.loads(args.previous.read_text()) if args.previous else {}
        write_json_atomic(args.result, run_stage_here(args.child, args.smoke, previous, args.deadline))
        return 0
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    isolate = on_cuda()
    results = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "targets": TARGETS,
               "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "isolated_stages": isolate, "stages": {}}
    previous_file = args.out / JSON_NAME
    if set(args.stages) != set(STAGES) and previous_file.is_file():  # a partial rerun keeps the other figures
        results["stages"] = json.loads(previous_file.read_text()).get("stages", {})
    with open(args.out / LOG_NAME, "a") as log:
        for name in args.stages:
            remaining = args.budget_s - (time.time() - t0)
            if remaining < 5:
                why = f"the {args.budget_s:.0f} s budget is spent"
                results["stages"][name] = {"status": "skipped", "reason": why, "headline": why}
                continue
            limit = min(STAGES[name].limit_s, remaining) if not args.smoke else remaining
            print(f"== {name} (limit {limit:.0f} s)", flush=True)
            log.write(f"\n== {name}\n")
            # In the smoke run fake_vs_real too runs in a child: the earlier stages' ZeRO-3 engines leave DeepSpeed's
            # patched linear in this process, whose backward fake tensors cannot run.
            if isolate or (args.smoke and name in ("environment", "fake_vs_real")):
                result = run_stage_isolated(name, args.smoke, results["stages"], limit, log)
            else:
                buffer = io.StringIO()
                with contextlib.redirect_stdout(buffer):
                    result = run_stage_here(name, args.smoke, results["stages"], time.time() + limit)
                log.write(buffer.getvalue())
            results["stages"][name] = result
            print(f"   {result.get('status')} in {result.get('seconds', 0):.1f} s: {result.get('headline', '')}", flush=True)
            log.flush()
            results["seconds"] = time.time() - t0
            write_json_atomic(args.out / JSON_NAME, results)  # a killed run still leaves what it measured
    results["seconds"] = time.time() - t0
    write_json_atomic(args.out / JSON_NAME, results)
    markdown = render_markdown(results)
    write_text_atomic(args.out / MD_NAME, markdown)
    print(markdown)
    return 0 if all(r.get("status") in ("ok", "skipped") for r in results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
