"""Parameters all-gathered per ZeRO-3 training step, as a multiple of the model's size, at 0/2/4/6 latents.

Coconut runs the base model once per latent (plus once for the rest of the sequence) before one backward.
ZeRO-3 gathers each layer's parameter shards before using the layer and frees them after; if it frees them
between passes, a step with 6 latents gathers the model about 7 times in the forward alone. This benchmark
counts the bytes DeepSpeed's own comms logger records for every all-gather, over a few steps per setting,
under 2 CPU ranks (gloo), and prints them as a multiple of the model's parameter bytes, with the memory that
keeping the weights resident costs (the peak of parameters gathered at once, from ZeRO-3's own status flags).

Variants (all use the harness's own `build_ds_config` + `build_engine`, so "recommended" is what training runs):
  recommended  the Coconut wrapper is the engine's module, stage3_max_live_parameters / max_reuse_distance
               large (ds_configs/zero3_*.json): the weights stay gathered across the latent passes.
  short_reuse  same wrapper, max_live_parameters = max_reuse_distance = half the model: a layer's next use (one
               pass later, a whole model away) is beyond the reuse distance, so it is freed and re-gathered.
               This is the large-model case: set both to at least the parameter count (recipes for 4B/8B do).
  release      same wrapper, but max_live_parameters = max_reuse_distance = 0: every layer is freed after each
               use, so each pass (and the backward) gathers it again. Least memory, most traffic.
  naive        the HF model alone is the engine's module and the wrapper calls the engine once per pass (what
               wrapping `deepspeed.initialize(model=hf_model)` gives): each call is a new ZeRO-3 "step".

    python benchmarks/bench_allgather.py            # spawns 2 ranks with torchrun; ~2-4 min on 2 cores
    python benchmarks/bench_allgather.py --variants recommended --latents 0 6 --steps 2

Target (issue 4): recommended at 6 latents <= 1.2x its 0-latent figure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("recommended", "short_reuse", "release", "naive")


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--latents", nargs="+", type=int, default=[0, 2, 4, 6])
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per setting (after 2 warm-up)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "allgather.json"))
    return p.parse_args(argv)


def recipe_for(args):
    from coconut_scale.config.recipe import recipe_from_dict

    h = args.hidden
    return recipe_from_dict({
        "name": "bench_allgather", "output_dir": "/tmp/bench_allgather", "seed": 0, "gpus_assumed": 2,
        "model": {"name_or_path": "bench-llama", "dtype": "fp32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": False,
                  "from_config": {"model_type": "llama", "hidden_size": h, "intermediate_size": 3 * h,
                                  "num_hidden_layers": args.layers, "num_attention_heads": 4,
                                  "num_key_value_heads": 4, "max_position_embeddings": 512}},
        "data": {"train_file": "unused.json", "val_file": "unused.json", "max_seq_len": 128},
        "coconut": {"mode": "coconut", "c_thought": 1, "max_latent_stage": max(args.latents)},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2, "world_sizes": [2]},
        "optim": {"lr": 1e-4, "epochs": 1, "grad_clip": 0.0},
        "deepspeed": {"config": "ds_configs/zero3_fp32.json",
                      # Partition every tensor so the count covers the whole model, norms included.
                      "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    }, source="bench_allgather")


def ds_config_for(variant: str, recipe, steps_total: int) -> dict:
    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.config.ds_config import build_ds_config

    plan = resolve_batch(recipe.batch, 2, recipe.data.max_seq_len)
    cfg = build_ds_config(recipe, plan, recipe.model.from_config["hidden_size"])
    cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    if variant in ("release", "short_reuse"):
        keep = 0 if variant == "release" else model_numel(recipe) // 2
        cfg["zero_optimization"].update(stage3_max_live_parameters=keep, stage3_max_reuse_distance=keep)
    return cfg


def model_numel(recipe) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(recipe.model.from_config)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, vocab_size=512 + 3)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def gathered_bytes(world_size: int) -> int:
    """Bytes of full tensors assembled by all-gathers since the comms logger was last cleared. The logger
    records an all-gather's message size as its input (this rank's shard), so the gathered tensor is that
    times the world size."""
    import deepspeed.comm as ds_comm

    total = 0
    for name, by_size in ds_comm.comms_logger.comms_dict.items():
        if "all_gather" in name or "allgather" in name:
            total += sum(size * record[0] for size, record in by_size.items())
    return total * world_size


class ResidentParams:
    """Peak number of parameter elements gathered at once, sampled after every module's forward and after every
    gradient accumulation in the backward."""

    def __init__(self, model: torch.nn.Module):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.params = [p for p in model.parameters() if hasattr(p, "ds_status")]
        self.available = ZeroParamStatus.AVAILABLE
        self.peak = 0
        for module in model.modules():
            module.register_forward_hook(lambda *_: self.sample())
        # During backward a layer's weights are gathered while its gradients accumulate.
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _: self.sample())

    def sample(self):
        now = sum(p.ds_numel for p in self.params if p.ds_status == self.available)
        self.peak = max(self.peak, now)


def batch_with_latents(tokens, n_latents: int, rank: int, vocab: int, micro: int = 2, q_len: int = 40) -> dict:
    """This rank's rows: a 40-token question, `n_latents` latents (none: no <start>/<end>), 12 answer tokens + EOS."""
    from coconut_scale.testing import latent_batch

    return latent_batch(tokens, [n_latents] * micro, [q_len] * micro, answer_len=12, seed=1000 + rank,
                        vocab=range(10, vocab)).as_dict()


def build(variant: str, recipe, tokenizer, steps_total: int):
    """(engine to step, module to call, Coconut wrapper) for the variant."""
    import deepspeed

    from coconut_scale.model.loading import build_coconut, load_causal_lm
    from coconut_scale.train.engine import build_engine
    from coconut_scale.train.strategy import DeepSpeedStrategy

    ds_config = ds_config_for(variant, recipe, steps_total)
    if variant != "naive":
        bundle = build_engine(recipe, ds_config, tokenizer, steps_total, log=lambda *_: None)
        return bundle.engine, bundle.engine, bundle.model, bundle.hf_ds_config
    strategy = DeepSpeedStrategy(ds_config)  # only for its ZeRO-3 context: this variant initializes by hand
    base = load_causal_lm("bench", dtype="fp32", attn_implementation="sdpa", from_config=recipe.model.from_config,
                          vocab_size=len(tokenizer), seed=recipe.seed)
    model = build_coconut(base, tokenizer, gather=strategy.gather)
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)
    ds_config["zero_allow_untested_optimizer"] = True
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=base, model_parameters=list(base.parameters()), optimizer=optimizer,
                                      config=ds_config)
    model.base_causallm = engine  # every pass is now a separate engine call
    return engine, model, model, strategy.hf_ds_config


def measure(variant: str, n_latents: int, args, recipe, tokenizer) -> dict:
    import deepspeed.comm as ds_comm

    from coconut_scale import distributed as dist
    from coconut_scale.model.tokens import LatentTokens

    tokens = LatentTokens.from_tokenizer(tokenizer)
    warmup = 2  # step 1 records ZeRO-3's module trace, step 2 is the first to prefetch from it
    engine, call, wrapper, keep_alive = build(variant, recipe, tokenizer, warmup + args.steps)
    n_params = sum(p.ds_numel for p in wrapper.parameters())
    bytes_per = next(wrapper.parameters()).element_size()
    resident = ResidentParams(wrapper)
    batch = batch_with_latents(tokens, n_latents, dist.rank(), len(tokenizer))
    per_step = []
    for step in range(warmup + args.steps):
        ds_comm.comms_logger.comms_dict.clear()
        passes = dist.all_reduce_max(wrapper.count_passes(batch["input_ids"]))
        out = call(**batch, num_passes=passes)
        engine.backward(out.loss)
        engine.step()
        if step >= warmup:
            per_step.append(gathered_bytes(dist.world_size()) / bytes_per / n_params)
    del keep_alive
    return {"variant": variant, "latents": n_latents, "passes": passes, "params": n_params,
            "gathered_x_model": sum(per_step) / len(per_step), "per_step": per_step,
            "peak_resident_params": resident.peak, "peak_resident_mb": resident.peak * bytes_per / 2**20}


def worker(args) -> None:
    import warnings

    from coconut_scale import distributed as dist
    from coconut_scale.testing import tiny_tokenizer
    from coconut_scale.train.strategy import init_distributed

    warnings.filterwarnings("ignore")
    init_distributed()
    recipe = recipe_for(args)
    tokenizer = tiny_tokenizer(vocab_size=512)
    rows = []
    for variant in args.variants:
        for n in args.latents:
            row = measure(variant, n, args, recipe, tokenizer)
            rows.append(row)
            if dist.is_main():
                print(f"  {variant:12s} latents {n}: {row['gathered_x_model']:.2f}x model gathered per step, "
                      f"peak resident {row['peak_resident_mb']:.1f} MB", flush=True)
    if dist.is_main():
        report(rows, args)


def report(rows: list[dict], args) -> None:
    base = {r["variant"]: r["gathered_x_model"] for r in rows if r["latents"] == 0}
    lines = ["| variant | latents | passes | gathered / step (x model) | vs 0 latents | peak resident params (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["gathered_x_model"] / base[r["variant"]] if r["variant"] in base else float("nan")
        r["vs_zero_latents"] = ratio
        lines.append(f"| {r['variant']} | {r['latents']} | {r['passes']} | {r['gathered_x_model']:.2f} | "
                     f"{ratio:.2f}x | {r['peak_resident_mb']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    rec6 = [r for r in rows if r["variant"] == "recommended" and r["latents"] == max(args.latents)]
    if rec6 and "recommended" in base:
        verdict = "meets" if rec6[0]["vs_zero_latents"] <= 1.2 else "MISSES"
        print(f"\nrecommended at {rec6[0]['latents']} latents: {rec6[0]['vs_zero_latents']:.2f}x the 0-latent "
              f"figure ({verdict} the <= 1.2x target)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "world_size": 2, "device": "cpu (gloo)",
               "model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "params": rows[0]["params"]},
               "steps_measured": args.steps, "torch": torch.__version__, "platform": platform.platform(),
               "rows": rows, "table": table}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        worker(args)
        return 0
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           *(argv if argv is not None else sys.argv[1:])]
    return subprocess.call(cmd, env=env, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
