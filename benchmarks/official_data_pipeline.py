"""One part of the official Coconut code's data path, timed in this (fresh) process: the child that
benchmarks/bench_data_pipeline.py runs under a separate interpreter with the official pins (transformers 4.46,
datasets), beside the harness's parts.

It imports `dataset.py` and `utils.py` from an exported snapshot of the official repository (`--coconut-dir`;
the benchmark exports it to a temporary folder) and calls them as its run.py does for GSM8K
(args/gsm_coconut.yaml):

    tokenize   get_dataset(train_path, tokenizer): Dataset.from_dict, then datasets.map(num_proc=32) of
               tokenizer.encode over question, steps and answer. The result lives in memory: nothing is cached
               across runs, so a second run repeats the work.
    stage      get_cot_latent_dataset(stage, base_dataset, configs, start_id, latent_id, end_id, shuffle=True),
               after an untimed get_dataset.
    collate    the stage dataset (its time is `wall_s`), then one rank's DataLoader (DistributedSampler over
               `--world` ranks, batch 32, MyCollator) for `--batches` micro-batches, as run.py iterates it (with
               num_workers=0: the same work in-process); their time is `collate_wall_s`.

The tokenizer is run.py's: AutoTokenizer.from_pretrained, pad = eos, the three latent tokens added. Prints one
line `RESULT {json}` with the part's wall time, this process's peak RSS and that of its largest child (the
map workers); the parent samples the whole process tree's memory as well.

Needs only the official dependencies (no coconut_scale import).
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


def load_official(coconut_dir: Path):
    sys.path.insert(0, str(coconut_dir))
    import dataset  # the official dataset.py
    import utils  # the official utils.py (Config, set_seed)

    return dataset, utils


def official_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token
    for token in ("<|start-latent|>", "<|end-latent|>", "<|latent|>"):
        tokenizer.add_tokens(token)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("latent_id", "<|latent|>"), ("start_id", "<|start-latent|>"), ("end_id", "<|end-latent|>"))}
    return tokenizer, ids


def official_configs(coconut_dir: Path, utils):
    import yaml

    return utils.Config(yaml.safe_load((coconut_dir / "args" / "gsm_coconut.yaml").read_text()))


def token_ids_digest(base) -> str:
    """The hash benchmarks/data_pipeline_parts.py takes of the harness's token ids, over get_dataset's columns."""
    h = hashlib.sha256()
    for q, steps, a in zip(base["question_tokenized"], base["steps_tokenized"], base["answer_tokenized"]):
        h.update(json.dumps([q, steps, a]).encode())
    return h.hexdigest()[:16]


def part_tokenize(args, dataset, configs, tokenizer, ids) -> dict:
    start = time.perf_counter()
    base = dataset.get_dataset(str(args.data), tokenizer)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "records": len(base), "cache": "none (in-memory Dataset.from_dict)",
            "token_ids_digest": token_ids_digest(base)}


def _stage_dataset(args, dataset, configs, tokenizer, ids):
    base = dataset.get_dataset(str(args.data), tokenizer)
    start = time.perf_counter()
    data = dataset.get_cot_latent_dataset(args.stage, base, configs, ids["start_id"], ids["latent_id"], ids["end_id"],
                                          no_special_marker=False, shuffle=True)
    return data, time.perf_counter() - start


def part_stage(args, dataset, configs, tokenizer, ids) -> dict:
    data, wall = _stage_dataset(args, dataset, configs, tokenizer, ids)
    return {"wall_s": wall, "stage": args.stage, "examples": len(data)}


def part_collate(args, dataset, configs, tokenizer, ids) -> dict:
    import torch
    from torch.utils.data.distributed import DistributedSampler

    data, stage_wall = _stage_dataset(args, dataset, configs, tokenizer, ids)
    collator = dataset.MyCollator(tokenizer, latent_id=ids["latent_id"], label_pad_token_id=-100)
    loader = torch.utils.data.DataLoader(data, num_workers=0, shuffle=False, batch_size=configs.batch_size_training,
                                         collate_fn=collator,
                                         sampler=DistributedSampler(data, num_replicas=args.world, rank=0,
                                                                    shuffle=True))
    per_batch = []
    start = time.perf_counter()
    t = start
    for i, _batch in enumerate(loader):
        now = time.perf_counter()
        per_batch.append(now - t)
        t = now
        if i + 1 == args.batches:
            break
    collate_wall = time.perf_counter() - start
    per_rank_batches = len(loader)
    return {"wall_s": stage_wall, "collate_wall_s": collate_wall, "stage": args.stage, "examples": len(data),
            "world": args.world, "micro_batches": len(per_batch),
            "micro_batch_size": configs.batch_size_training,
            "median_ms_per_micro_batch": round(1000 * statistics.median(per_batch), 3),
            "per_rank_s_extrapolated": statistics.mean(per_batch) * per_rank_batches,
            "micro_batches_per_rank_per_epoch": per_rank_batches}


PARTS = {"tokenize": part_tokenize, "stage": part_stage, "collate": part_collate}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="one part of the official data path (internal)")
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--coconut-dir", type=Path, required=True, help="exported official snapshot")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    dataset, utils = load_official(args.coconut_dir)
    configs = official_configs(args.coconut_dir, utils)
    utils.set_seed(configs.seed)
    tokenizer, ids = official_tokenizer(args.tokenizer_dir)
    imports_s = time.perf_counter() - start
    result = PARTS[args.part](args, dataset, configs, tokenizer, ids)
    result["setup_s"] = round(time.perf_counter() - start - result["wall_s"], 3)
    result["imports_s"] = round(imports_s, 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["largest_child_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    import datasets
    import transformers

    result["versions"] = {"transformers": transformers.__version__, "datasets": datasets.__version__}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
