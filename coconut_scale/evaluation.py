"""Batched, rank-sharded generation and scoring (answer accuracy, CoT exact match, token counts).

Scoring follows the official run.py: the answer is the text after the last '#', commas removed, stripped;
the CoT is the generated text before the first '#'. We decode only the generated continuation (not the
prompt), and the gold CoT is the steps that remain in text at the evaluated stage (all of them at stage
0), which is what the model is asked to write.

Under data parallelism every rank must make the same sequence of model calls (ZeRO-3 gathers parameters
collectively): ranks with a shorter shard run dummy batches, the pass count is all-reduced per batch, and
the decode loop stops only when every rank is done.
"""

from __future__ import annotations

import math
import time

import torch

from coconut_scale import distributed as dist
from coconut_scale.collate import left_pad_for_generation


def extract_answer(generated: str) -> str:
    return generated.split("#")[-1].replace(",", "").strip()


def extract_cot(generated: str) -> str:
    return generated.split("#")[0].strip()


def gold_cot(example: dict) -> str:
    """The steps still written out at the evaluated stage (`n_skipped_steps` are replaced by latents)."""
    steps = example.get("steps") or []
    return "\n".join(s.strip() for s in steps[example.get("n_skipped_steps", 0):]).strip()


def score_example(example: dict, generated_text: str) -> dict:
    answer = extract_answer(generated_text)
    gold = str(example.get("answer", "")).replace(",", "").strip()
    return {
        "idx": example.get("idx", -1),
        "generated": generated_text,
        "pred_answer": answer,
        "gold_answer": gold,
        "correct": answer == gold,
        "cot_match": extract_cot(generated_text) == gold_cot(example),
        "n_latents": example.get("n_latents", 0),
    }


@torch.no_grad()
def generate_and_score(
    model,
    examples: list[dict],
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device | None = None,
    progress=None,
) -> dict:
    """Generate for this rank's shard of `examples`; return totals summed over ranks and all per-example rows.

    `model` is a Coconut wrapper (or anything with its generate/count_passes). Every rank gets the totals;
    `rows` (per-example outputs) are gathered on every rank too, in example order.
    """
    device = device or dist.device()
    rank, world = dist.rank(), dist.world_size()
    shard = examples[rank::world]
    n_batches = dist.all_reduce_max(math.ceil(len(shard) / batch_size))
    filler = examples[:1]  # dummy batches keep ranks with short shards in step; their outputs are discarded
    rows, new_tokens, start = [], 0, time.perf_counter()
    was_training = model.training
    model.eval()
    for b in range(n_batches):
        batch = shard[b * batch_size : (b + 1) * batch_size]
        real = len(batch)
        if not batch:
            batch = filler
        ids, mask, pos = left_pad_for_generation([ex["input_ids"] for ex in batch], tokenizer.pad_token_id)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        passes = dist.all_reduce_max(model.count_passes(ids))
        out = model.generate(
            ids, mask, max_new_tokens=max_new_tokens, position_ids=pos, num_passes=passes, sync_finished=dist.all_done
        )
        continuation = out[:, ids.shape[1] :].tolist()
        for ex, gen in zip(batch[:real], continuation):
            gen = _until_eos(gen, model.eos_token_id)
            new_tokens += len(gen)
            text = tokenizer.decode(gen, skip_special_tokens=True)
            rows.append({**score_example(ex, text), "n_new_tokens": len(gen)})
        if progress is not None:
            progress.update(1)
    elapsed = time.perf_counter() - start
    if was_training:
        model.train()
    correct, cot, total, tokens, latents = dist.all_reduce_sum(
        [sum(r["correct"] for r in rows), sum(r["cot_match"] for r in rows), len(rows), new_tokens,
         sum(r["n_latents"] for r in rows)]
    )
    all_rows = sorted((r for part in dist.gather_objects(rows) for r in part), key=lambda r: r["idx"])
    total = max(total, 1)
    return {
        "accuracy": correct / total,
        "cot_exact_match": cot / total,
        "n_examples": int(total),
        "mean_new_tokens": tokens / total,
        "mean_latents": latents / total,
        "examples_per_s": total / max(dist.all_reduce_max(int(elapsed * 1000)) / 1000, 1e-9),
        "rows": all_rows,
    }


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


@torch.no_grad()
def validation_loss(model, loader, device, num_passes_fn=None) -> float:
    """Mean of per-batch losses over every rank's shard, weighted by supervised tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        passes = num_passes_fn(batch["input_ids"]) if num_passes_fn else None
        out = model(**batch, num_passes=passes)
        n = float((batch["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    if was_training:
        model.train()
    total, count = dist.all_reduce_sum([total, count])
    return total / max(count, 1.0)
