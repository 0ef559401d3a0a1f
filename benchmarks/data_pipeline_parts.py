"""One part of the harness's training data path, timed in this (fresh) process: the child side of
benchmarks/bench_data_pipeline.py, which starts one process per part so that each peak RSS is that part's own.

Each part makes the calls coconut_scale/train/trainer.py makes, with recipes/gpt2_gsm_coconut.yaml's settings:

    records          load_records(train_file): parse + validate every record
    tokenize         Trainer._tokenize's load_tokenized(train_file, tokenizer, max_seq_len, cache_dir, c_thought,
                     max_latent_stage, role="train"): first run when the cache folder is empty, else cached
    stage            Trainer.train_epoch's build_stage_dataset(train_recs, stage, cfg, tokens, seed=seed*1000+epoch)
    collate          every micro-batch of one epoch on every rank (GlobalBatchSampler at `--world`), through
                     LatentAlignedCollator and its latent_columns, as Trainer._micro_step calls them
    sampler          64 ranks' GlobalBatchSampler(n, plan, rank, seed).micro_batches(epoch): disjoint, covering,
                     and equal to a sampler resumed at a step (`micro_batches(epoch, step_in_epoch)`)
    sampler_resumed  samplers resumed at those steps in a fresh process, digests only (the parent compares)

It prints one line `RESULT {json}`: the part's wall time (`wall_s`, setup excluded), this process's peak RSS,
the setup time (imports, tokenizer, loading what the part needs) and what the part found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "gpt2_gsm_coconut.yaml"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def recipe_for(data: Path, cache_dir: Path):
    from coconut_scale.config.recipe import load_recipe

    return load_recipe(RECIPE, [f"data.train_file={data}", f"data.cache_dir={cache_dir}"])


def tokenized_train_records(recipe, tokenizer):
    """Trainer._tokenize's call for the training file."""
    from coconut_scale.data.curriculum import CurriculumConfig
    from coconut_scale.data.tokenized import load_tokenized

    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    return load_tokenized(recipe.data.train_file, tokenizer, recipe.data.max_seq_len, recipe.data.cache_dir,
                          cfg.c_thought, cfg.max_latent_stage, role="train")


def first_epoch_of(stage: int, cfg, epochs: int) -> int:
    from coconut_scale.data.curriculum import stage_for_epoch

    return next(e for e in range(epochs) if stage_for_epoch(e, cfg) == stage)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def token_ids_digest(tokenized: list[dict]) -> str:
    """One hash of every record's [question ids, steps ids, answer ids], record by record (the official driver
    hashes its get_dataset output the same way, so equal digests mean equal token ids)."""
    h = hashlib.sha256()
    for r in tokenized:
        h.update(json.dumps([r["question_ids"], r["steps_ids"], r["answer_ids"]]).encode())
    return h.hexdigest()[:16]


def part_records(args, recipe, tokenizer) -> dict:
    from coconut_scale.data.records import load_records

    start = time.perf_counter()
    records = load_records(recipe.data.train_file)
    return {"wall_s": time.perf_counter() - start, "records": len(records)}


def part_tokenize(args, recipe, tokenizer) -> dict:
    cache = Path(recipe.data.cache_dir)
    was_empty = not any(cache.glob("*.json")) if cache.exists() else True
    start = time.perf_counter()
    kept, dropped = tokenized_train_records(recipe, tokenizer)
    wall = time.perf_counter() - start
    files = sorted(cache.glob("*.json"))
    return {"wall_s": wall, "cache": "empty" if was_empty else "present", "kept": len(kept), "dropped": dropped,
            "tokens": sum(len(r["question_ids"]) + sum(map(len, r["steps_ids"])) + len(r["answer_ids"]) for r in kept),
            "cache_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
            "token_ids_digest": token_ids_digest(kept)}


def part_stage(args, recipe, tokenizer) -> dict:
    from coconut_scale.data.curriculum import CurriculumConfig, build_stage_dataset
    from coconut_scale.model.tokens import LatentTokens

    train_recs, _ = tokenized_train_records(recipe, tokenizer)
    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    tokens = LatentTokens.from_tokenizer(tokenizer)
    epoch = first_epoch_of(args.stage, cfg, recipe.optim.epochs)
    start = time.perf_counter()
    data = build_stage_dataset(train_recs, args.stage, cfg, tokens, seed=recipe.seed * 1000 + epoch)
    wall = time.perf_counter() - start
    lengths = [len(ex["input_ids"]) for ex in data.examples]
    return {"wall_s": wall, "stage": args.stage, "epoch": epoch, "examples": len(data),
            "mean_len": round(statistics.mean(lengths), 1), "max_len": max(lengths),
            "latents": sorted({ex["n_latents"] for ex in data.examples})}


def part_collate(args, recipe, tokenizer) -> dict:
    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.data.collate import LatentAlignedCollator
    from coconut_scale.data.curriculum import CurriculumConfig, build_stage_dataset
    from coconut_scale.data.sampler import GlobalBatchSampler
    from coconut_scale.model.tokens import LatentTokens

    train_recs, _ = tokenized_train_records(recipe, tokenizer)
    cfg = CurriculumConfig.from_recipe(recipe.coconut)
    tokens = LatentTokens.from_tokenizer(tokenizer)
    epoch = first_epoch_of(args.stage, cfg, recipe.optim.epochs)
    data = build_stage_dataset(train_recs, args.stage, cfg, tokens, seed=recipe.seed * 1000 + epoch)
    plan = resolve_batch(recipe.batch, args.world, recipe.data.max_seq_len)
    micro_batches = [mb for rank in range(args.world)
                     for mb in GlobalBatchSampler(len(data), plan, rank, seed=recipe.seed).micro_batches(epoch)]
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    per_batch, widths = [], []
    start = time.perf_counter()
    for mb in micro_batches:
        t = time.perf_counter()
        features = [data[i] for i in mb]
        batch = collate(features)
        collate.latent_columns(features)
        per_batch.append(time.perf_counter() - t)
        widths.append(batch["input_ids"].shape[1])
    wall = time.perf_counter() - start
    return {"wall_s": wall, "stage": args.stage, "world": args.world, "micro_batch_size": plan.micro_batch_size,
            "micro_batches": len(micro_batches), "per_rank_s": wall / args.world,
            "median_ms_per_micro_batch": round(1000 * statistics.median(per_batch), 3),
            "mean_width": round(statistics.mean(widths), 1)}


def _resume_steps(steps_per_epoch: int) -> list[int]:
    return sorted({1, steps_per_epoch // 2 + 1, steps_per_epoch - 1})


def part_sampler(args, recipe, tokenizer) -> dict:
    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.data.sampler import GlobalBatchSampler

    plan = resolve_batch(recipe.batch, args.world, recipe.data.max_seq_len)
    start = time.perf_counter()
    per_rank = [list(GlobalBatchSampler(args.n, plan, rank, seed=recipe.seed).micro_batches(args.epoch))
                for rank in range(args.world)]
    wall = time.perf_counter() - start
    sampler = GlobalBatchSampler(args.n, plan, 0, seed=recipe.seed)
    steps = sampler.steps_per_epoch
    seen = [i for batches in per_rank for mb in batches for i in mb]
    expected = sampler.permutation(args.epoch)[:steps * plan.global_batch_size]
    resumed_equal, tails = True, {}
    for k in _resume_steps(steps):
        for rank in range(args.world):
            resumed = list(GlobalBatchSampler(args.n, plan, rank, seed=recipe.seed).micro_batches(args.epoch, k))
            resumed_equal &= resumed == per_rank[rank][k * plan.grad_accum:]
        tails[str(k)] = digest([per_rank[r][k * plan.grad_accum:] for r in range(args.world)])
    return {"wall_s": wall, "per_rank_s": wall / args.world, "world": args.world, "n": args.n,
            "steps_per_epoch": steps, "micro_batch_size": plan.micro_batch_size,
            "disjoint": len(seen) == len(set(seen)),
            "covering": sorted(seen) == sorted(expected) and len(seen) == args.n - args.n % plan.global_batch_size,
            "full_micro_batches": all(len(mb) == plan.micro_batch_size for b in per_rank for mb in b),
            "resumed_equal_in_process": resumed_equal, "tail_digests": tails}


def part_sampler_resumed(args, recipe, tokenizer) -> dict:
    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.data.sampler import GlobalBatchSampler

    plan = resolve_batch(recipe.batch, args.world, recipe.data.max_seq_len)
    steps = GlobalBatchSampler(args.n, plan, 0, seed=recipe.seed).steps_per_epoch
    start = time.perf_counter()
    tails = {str(k): digest([list(GlobalBatchSampler(args.n, plan, r, seed=recipe.seed).micro_batches(args.epoch, k))
                             for r in range(args.world)]) for k in _resume_steps(steps)}
    return {"wall_s": time.perf_counter() - start, "tail_digests": tails}


PARTS = {"records": part_records, "tokenize": part_tokenize, "stage": part_stage, "collate": part_collate,
         "sampler": part_sampler, "sampler_resumed": part_sampler_resumed}
NEEDS_TOKENIZER = {"tokenize", "stage", "collate"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="one part of the data path (internal)")
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--world", type=int, default=64)
    parser.add_argument("--epoch", type=int, default=3)
    parser.add_argument("--n", type=int, help="training examples (sampler parts)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    recipe = recipe_for(args.data, args.cache_dir)
    tokenizer = None
    if args.part in NEEDS_TOKENIZER:
        from coconut_scale.model.loading import load_tokenizer

        tokenizer = load_tokenizer(str(args.tokenizer_dir))  # what recipe_tokenizer calls for a folder
    imports_s = time.perf_counter() - start
    result = PARTS[args.part](args, recipe, tokenizer)
    result["setup_s"] = round(time.perf_counter() - start - result["wall_s"], 3)
    result["imports_s"] = round(imports_s, 3)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    import coconut_scale

    result["package"] = str(Path(coconut_scale.__file__).parent)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
