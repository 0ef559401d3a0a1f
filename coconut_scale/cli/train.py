"""Train Coconut through its whole curriculum with a DeepSpeed engine.

    deepspeed --num_gpus 8 --module coconut_scale.train recipes/llama8b_gsm.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 -m coconut_scale.train recipes/llama8b_gsm.yaml
    python -m coconut_scale.train recipes/demo_cpu.yaml

Re-running the same command after a crash resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from coconut_scale import distributed as dist
from coconut_scale.config.batch_plan import BatchMathError, BatchPlan, format_batch_table, resolve_batch
from coconut_scale.atomic_files import write_jsonl_atomic
from coconut_scale.train.checkpoints import CheckpointManager, export_hf
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.data.curriculum import (
    CurriculumConfig,
    build_eval_dataset,
    build_stage_dataset,
    stage_for_epoch,
    train_layout,
)
from coconut_scale.config.ds_config import build_ds_config
from coconut_scale.train.strategy import (
    build_engine,
    current_lr,
    global_grad_norm,
    hidden_size_of,
    peak_memory_gb,
    reset_optimizer,
)
from coconut_scale.evaluate.generation import generate_and_score, validation_loss
from coconut_scale.config.recipe import check_files, load_recipe
from coconut_scale.train.run_log import RunLog
from coconut_scale.data.sampler import GlobalBatchSampler
from coconut_scale.data.tokenized import load_tokenized
from coconut_scale.model.tokens import LatentTokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=1e-5 batch.micro_batch_size=2")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def curriculum_of(recipe) -> CurriculumConfig:
    c = recipe.coconut
    return CurriculumConfig(mode=c.mode, c_thought=c.c_thought, epochs_per_stage=c.epochs_per_stage,
                            max_latent_stage=c.max_latent_stage, pad_latent_to_max=c.pad_latent_to_max,
                            uniform_prob=c.uniform_prob)


def stage_passes(stage: int, cfg: CurriculumConfig) -> int:
    """Base-model calls a batch at this stage needs at most (constant within a stage keeps ZeRO-3's trace valid)."""
    if not cfg.latent_feedback:
        return 1
    return cfg.thoughts_per_step * min(stage, cfg.max_latent_stage) + 1


def prepare_data(recipe, log) -> None:
    """Generate the embedded default data set when the recipe asks for it (rank 0), then sync."""
    gen = recipe.data.generate
    if gen and dist.is_main() and not (Path(recipe.data.train_file).exists() and Path(recipe.data.val_file).exists()):
        from coconut_scale.data import prosqa_synthetic
        from coconut_scale.data.records import write_records

        kind = gen.get("kind", "prosqa_synthetic")
        if kind != "prosqa_synthetic":
            raise ValueError(f"data.generate.kind={kind!r}: only 'prosqa_synthetic' can be generated")
        options = {k: v for k, v in gen.items() if k not in ("kind", "n_train", "n_val", "seed")}
        sizes = {"train": int(gen.get("n_train", 2000)), "val": int(gen.get("n_val", 200))}
        splits = prosqa_synthetic.generate_splits(sizes, seed=int(gen.get("seed", 0)), **options)  # disjoint
        for path, split in ((recipe.data.train_file, "train"), (recipe.data.val_file, "val")):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_records(splits[split], path)
            log(f"generated {sizes[split]} ProsQA-style records -> {path}")
    dist.barrier()


def load_tokenizer_for(recipe):
    from coconut_scale.model.loading import load_tokenizer

    if recipe.checkpoint.init_from:
        return load_tokenizer(recipe.checkpoint.init_from)
    source = recipe.model.tokenizer or recipe.model.name_or_path
    if source.startswith("train-bpe"):
        return trained_tokenizer(recipe, source)
    return load_tokenizer(source, recipe.model.gguf_file if not recipe.model.tokenizer else None)


def trained_tokenizer(recipe, spec: str):
    """`train-bpe:N`: a byte-level BPE of N tokens fit on the training file (small from-scratch models)."""
    from coconut_scale.model.loading import load_tokenizer
    from coconut_scale.data.records import load_records
    from coconut_scale.testing import tiny_tokenizer

    vocab = int(spec.split(":")[1]) if ":" in spec else 512
    target = Path(recipe.output_dir) / "tokenizer"
    if dist.is_main() and not (target / "tokenizer.json").exists():
        records = load_records(recipe.data.train_file)
        corpus = [r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"] for r in records]
        tiny_tokenizer(vocab_size=vocab, corpus=corpus).save_pretrained(str(target))
    dist.barrier()
    return load_tokenizer(str(target))


def main(argv=None) -> int:
    # torch.distributed deprecation notices fire on every ZeRO collective; they drown the training log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    args = parse_args(argv)
    # Everything that can be wrong with the recipe fails here, before any process group or model exists.
    recipe = load_recipe(args.recipe, args.overrides)
    check_files(recipe)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = resolve_batch(recipe.batch, world, recipe.data.max_seq_len)
    hidden = hidden_size_of(recipe)
    build_ds_config(recipe, plan, hidden, total_steps=1)  # contradictions fail now, not after loading

    dist.init_distributed()
    torch.manual_seed(recipe.seed)
    out = Path(recipe.output_dir)
    log = RunLog(out, recipe.logging.wandb_project, recipe.logging.wandb_run_name, recipe.resolved_dict())
    log.print(f"coconut_scale: {recipe.name} | world size {world} | output {out}")
    log.print(format_batch_table([plan]))
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.resolved_dict(), sort_keys=False))
    prepare_data(recipe, log.print)

    tokenizer = load_tokenizer_for(recipe)
    tokens = LatentTokens.from_tokenizer(tokenizer)
    cfg = curriculum_of(recipe)
    cache_dir = recipe.data.cache_dir or str(out / "token_cache")
    train_recs, dropped = load_tokenized(recipe.data.train_file, tokenizer, recipe.data.max_seq_len, cache_dir,
                                         cfg.c_thought, cfg.max_latent_stage)
    val_recs, val_dropped = load_tokenized(recipe.data.val_file, tokenizer, recipe.data.max_seq_len, cache_dir,
                                           cfg.c_thought, cfg.max_latent_stage)
    log.print(f"data: {len(train_recs)} train records ({dropped} dropped > max_seq_len {recipe.data.max_seq_len}), "
              f"{len(val_recs)} validation ({val_dropped} dropped)")
    if recipe.data.eval_max_examples:
        val_recs = val_recs[: recipe.data.eval_max_examples]

    sampler = GlobalBatchSampler(len(train_recs), plan, dist.rank(), seed=recipe.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"{recipe.data.train_file}: {len(train_recs)} records give no full global batch of "
                         f"{plan.global_batch_size}")
    schedule_steps = steps_per_epoch * (cfg.epochs_per_stage if recipe.coconut.reset_optimizer else recipe.optim.epochs)
    ds_config = build_ds_config(recipe, plan, hidden, total_steps=schedule_steps)
    ckpts = CheckpointManager(out / "checkpoints", recipe.checkpoint.keep_last)
    latest = ckpts.latest() if recipe.checkpoint.auto_resume else None
    # A checkpoint from another GPU count loads only through its universal copy (coconut_scale.universal).
    universal = latest is not None and ckpts.needs_universal(latest, world)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    bundle = build_engine(recipe, ds_config, tokenizer, schedule_steps, log=log.print)
    engine, model = bundle.engine, bundle.model
    device = engine.device
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)

    state = {"epoch": recipe.checkpoint.resume_from_epoch, "step_in_epoch": 0, "global_step": 0,
             "best_accuracy": -1.0, "stage": None}
    if latest is not None:
        state = ckpts.load(engine, latest, universal=universal)
        state.pop("world_size", None)
        log.print(f"resumed from {latest}{' (universal copy)' if universal else ''} (epoch {state['epoch']}, "
                  f"step {state['step_in_epoch']} of {steps_per_epoch}, global step {state['global_step']})")
    side_files = {"recipe.resolved.yaml": yaml.safe_dump(recipe.resolved_dict(), sort_keys=False),
                  "batch_table.txt": format_batch_table(_resolvable_plans(recipe, plan)) + "\n"}

    def save(loop_state):
        ckpts.save(engine, loop_state, side_files)

    def export(name: str, stage: int, extra: dict):
        meta = {"c_thought": cfg.c_thought, "stage": stage, "mode": cfg.mode, "max_latent_stage": cfg.max_latent_stage,
                "pad_latent_to_max": cfg.pad_latent_to_max, **tokens.to_dict(), **extra}
        from coconut_scale.model.lora import merged_base_for_export

        to_base = merged_base_for_export(model) if bundle.lora else None
        path = export_hf(engine, tokenizer, out / "hf" / name, meta, to_base=to_base)
        log.print(f"exported HF model -> {path}") if path else None

    engine.train()
    for epoch in range(state["epoch"], recipe.optim.epochs):
        stage = stage_for_epoch(epoch, cfg)
        if state.get("stage") is not None and stage != state["stage"] and recipe.coconut.reset_optimizer \
                and state["step_in_epoch"] == 0:
            reset_optimizer(bundle, recipe)
            log.print(f"stage {state['stage']} -> {stage}: optimizer state and LR schedule reset")
        state["stage"] = stage
        data = build_stage_dataset(train_recs, stage, cfg, tokens, seed=recipe.seed * 1000 + epoch)
        passes_floor = stage_passes(stage, cfg)
        start_step = state["step_in_epoch"]
        bar = log.progress(steps_per_epoch, f"epoch {epoch} stage {stage}", initial=start_step)
        t_last, tokens_since = time.perf_counter(), 0
        micro_iter = sampler.micro_batches(epoch, start_step)
        for step in range(start_step, steps_per_epoch):
            losses = []
            for _ in range(plan.grad_accum):
                batch = collate([data[i] for i in next(micro_iter)])
                batch = {k: v.to(device) for k, v in batch.items()}
                # Every rank runs the same number of base-model calls, or ZeRO-3's collectives hang.
                passes = dist.all_reduce_max(max(model.count_passes(batch["input_ids"]), passes_floor))
                loss = engine(**batch, num_passes=passes).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                tokens_since += int(batch["attention_mask"].sum())
            state.update(step_in_epoch=step + 1, global_step=state["global_step"] + 1, epoch=epoch)
            bar.update(1)
            if state["global_step"] % recipe.logging.log_every_steps == 0 or step + 1 == steps_per_epoch:
                elapsed = time.perf_counter() - t_last
                tok_s = dist.all_reduce_sum([tokens_since])[0] / max(elapsed, 1e-9)
                loss_avg = dist.all_reduce_sum([sum(losses) / len(losses)])[0] / dist.world_size()
                log.log("train", global_step=state["global_step"], epoch=epoch, stage=stage, loss=loss_avg,
                        lr=current_lr(engine), grad_norm=global_grad_norm(engine), latent_passes=passes - 1,
                        tokens_per_s=tok_s, peak_mem_gb=peak_memory_gb())
                bar.set_postfix(loss=f"{loss_avg:.3f}")
                t_last, tokens_since = time.perf_counter(), 0
            every = recipe.checkpoint.save_every_steps
            if every and state["global_step"] % every == 0 and step + 1 < steps_per_epoch:
                save(dict(state))
        bar.close()

        # End of epoch: validation loss, generation accuracy, checkpoint, exports.
        metrics = {"epoch": epoch, "stage": stage, "global_step": state["global_step"]}
        if (epoch + 1) % recipe.eval.every_epochs == 0 or epoch + 1 == recipe.optim.epochs:
            val_data = build_stage_dataset(val_recs, stage, cfg, tokens, seed=recipe.seed * 1000 + epoch)
            val_loader = _validation_batches(val_data, recipe.batch.eval_batch_size, collate)
            metrics["val_loss"] = validation_loss(
                engine, val_loader, device,
                num_passes_fn=lambda ids: dist.all_reduce_max(max(model.count_passes(ids), passes_floor)))
            if recipe.eval.generation:
                examples = []
                for rec in val_recs:
                    ex = build_eval_dataset([rec], stage, cfg, tokens)[0]
                    ex["n_skipped_steps"] = train_layout(len(rec["steps_ids"]), stage, cfg)[0]
                    examples.append(ex)
                result = generate_and_score(engine.module, examples, tokenizer, recipe.batch.eval_batch_size,
                                            recipe.eval.max_new_tokens, device)
                rows = result.pop("rows")
                metrics.update(result)
                if dist.is_main():
                    write_jsonl_atomic(out / "samples" / f"epoch{epoch:03d}.jsonl",
                                       rows[: recipe.logging.num_sample_outputs])
            log.log("eval", **metrics)
            log.print("epoch {epoch} stage {stage}: ".format(**metrics) +
                      " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        state.update(epoch=epoch + 1, step_in_epoch=0)
        accuracy = metrics.get("accuracy")
        is_best = accuracy is not None and accuracy > state["best_accuracy"]
        if is_best:
            state["best_accuracy"] = accuracy
        save(dict(state))
        if recipe.checkpoint.export_hf:
            stage_ends = epoch + 1 == recipe.optim.epochs or stage_for_epoch(epoch + 1, cfg) != stage
            if stage_ends:
                export(f"stage{stage}", stage, {"epoch": epoch, **_floats(metrics)})
            if is_best:
                export("best", stage, {"epoch": epoch, **_floats(metrics)})
    log.print(f"done: best accuracy {state['best_accuracy']:.4f}; outputs in {out}")
    log.close()
    dist.finish()
    return 0


def _resolvable_plans(recipe, current: BatchPlan) -> list[BatchPlan]:
    """The running world size's plan plus every listed one that resolves. A world size this run does not use
    must not stop it (the check command reports those); it is left out of the saved table instead."""
    plans = {current.world_size: current}
    for ws in recipe.batch.world_sizes:
        try:
            plans.setdefault(ws, resolve_batch(recipe.batch, ws, recipe.data.max_seq_len))
        except BatchMathError:
            pass
    return [plans[ws] for ws in sorted(plans)]


def _floats(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _validation_batches(val_data, batch_size: int, collate) -> list[dict]:
    """This rank's validation batches. All ranks get the same count, or ZeRO-3 hangs: short ranks add
    filler batches whose labels are all -100, so they run the forward but count zero tokens."""
    idx = list(range(dist.rank(), len(val_data), dist.world_size()))
    batches = [collate([val_data[i] for i in idx[j : j + batch_size]]) for j in range(0, len(idx), batch_size)]
    for _ in range(dist.all_reduce_max(len(batches)) - len(batches)):
        filler = collate([val_data[0]])
        filler["labels"].fill_(-100)
        batches.append(filler)
    return batches


if __name__ == "__main__":
    sys.exit(main())
