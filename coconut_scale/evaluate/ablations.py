"""Ablations on one checkpoint and data set: continuous feedback off, and fewer latents than trained.

    python -m coconut_scale.evaluate.ablations CHECKPOINT DATA [--stage K] [--fewer 0 1 ...]
        [--batch-size B] [--max-examples N] [--out DIR]

Variants, all on the prompts of stage K (default: the checkpoint's stage):
    full          as trained: every latent is fed the last hidden state before it
    no_feedback   the same prompts, but latents enter as the plain <|latent|> token embedding (no hidden state
                  is fed back): what is left when the continuous thoughts carry no information
    latents<=k    continuous feedback on, each prompt keeps at most k of its latents (the rest are removed;
                  the text to produce is unchanged): how much the later thoughts contribute
Metrics, side by side:
    loss          mean cross-entropy per token, teacher-forced, over the gold text after the prompt (the steps
                  the stage still writes out, and "### answer" + EOS), as in validation loss
    answer_ppl    exp(mean cross-entropy over the answer tokens only: "### answer" + EOS)
    accuracy      greedy generation, scored as python -m coconut_scale.eval does (and cot_exact_match, # tokens)
Losses are token-weighted over all examples of all ranks. Outputs in --out (default
runs/<name>/eval/<export>/ablations-stage<K>/): ablations.json, ablations.md (the table), ablations.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from coconut_scale import distributed as dist
from coconut_scale.evaluate.inputs import add_common_args, check_common_args, open_inputs
from coconut_scale.atomic_files import write_json_atomic, write_text_atomic
from coconut_scale.errors import run_cli
from coconut_scale.evaluate.runtime import (
    InputError,
    new_figure,
    progress,
    save_png,
    say,
)
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.model.tokens import IGNORE_INDEX
from coconut_scale.evaluate.generation import generate_and_score


@dataclass(frozen=True)
class Variant:
    name: str
    feedback: bool
    max_latents: int | None = None  # None: the stage's latents


def make_variants(n_latents: int, fewer: list[int] | None) -> list[Variant]:
    caps = list(range(n_latents)) if fewer is None else sorted(set(fewer))
    for k in caps:
        if not 0 <= k < n_latents:
            raise InputError(f"--fewer {k}: must be between 0 and {n_latents - 1} (the prompts have up to "
                             f"{n_latents} latents at this stage)")
    return [Variant("full", True), Variant("no_feedback", False)] + [Variant(f"latents<={k}", True, k) for k in caps]


def cap_latents(example: dict, cap: int | None, latent_id: int) -> dict:
    """The example with only its first `cap` latents (all when cap is None); markers and question unchanged."""
    if cap is None or example["n_latents"] <= cap:
        return example
    ids, kept = [], 0
    for t in example["input_ids"]:
        if t == latent_id:
            if kept == cap:
                continue
            kept += 1
        ids.append(t)
    return {**example, "input_ids": ids, "n_latents": cap}


def scored_sequence(example: dict) -> dict:
    """Prompt + the gold remaining steps + answer, with labels for the loss and for the answer alone."""
    steps = [t for s in example["steps_ids"][example["n_skipped_steps"]:] for t in s]
    answer = list(example["answer_ids"])
    prompt = list(example["input_ids"])
    return {
        "input_ids": prompt + steps + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + steps + answer,
        "answer_labels": [IGNORE_INDEX] * (len(prompt) + len(steps)) + answer,
    }


def _nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over labels that are not -100, and how many there are."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    nll = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(nll), int((shift_labels != IGNORE_INDEX).sum())


@torch.no_grad()
def teacher_forced(model, examples: list[dict], batch_size: int, pad_id: int, latent_id: int) -> dict:
    """Token-weighted loss over the text after the prompt and over the answer, summed over every rank's shard."""
    collate = LatentAlignedCollator(pad_id, latent_id)
    shard = examples[dist.rank()::dist.world_size()]
    sums = [0.0, 0.0, 0.0, 0.0]  # nll, tokens, answer nll, answer tokens
    for i in range(0, len(shard), batch_size):
        seqs = [scored_sequence(ex) for ex in shard[i:i + batch_size]]
        batch = collate([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in seqs])
        # The layout depends only on input_ids, so the answer-only labels line up with the same columns.
        answer_labels = collate([{"input_ids": s["input_ids"], "labels": s["answer_labels"]} for s in seqs])["labels"]
        device = dist.device()
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                       position_ids=batch["position_ids"].to(device)).logits
        nll, n = _nll_sum(logits, batch["labels"])
        a_nll, a_n = _nll_sum(logits, answer_labels)
        sums = [sums[0] + nll, sums[1] + n, sums[2] + a_nll, sums[3] + a_n]
    nll, n, a_nll, a_n = dist.all_reduce_sum(sums)
    answer_nll = a_nll / max(a_n, 1.0)
    return {"loss": nll / max(n, 1.0), "answer_nll": answer_nll, "answer_ppl": math.exp(answer_nll),
            "n_loss_tokens": int(n), "n_answer_tokens": int(a_n)}


def run_ablations(inputs, variants: list[Variant], batch_size: int, max_new_tokens: int) -> list[dict]:
    model, tokens = inputs.model, inputs.tokens
    trained_feedback = model.feedback
    bar = progress(len(variants), "ablations")
    rows = []
    try:
        for v in variants:
            model.feedback = v.feedback
            examples = [cap_latents(ex, v.max_latents, tokens.latent_id) for ex in inputs.examples]
            losses = teacher_forced(model, examples, batch_size, tokens.pad_id, tokens.latent_id)
            gen = generate_and_score(model, examples, inputs.tokenizer, batch_size, max_new_tokens, dist.device())
            rows.append({"variant": v.name, "feedback": v.feedback, "max_latents": v.max_latents,
                         "mean_latents": gen["mean_latents"], **losses, "accuracy": gen["accuracy"],
                         "cot_exact_match": gen["cot_exact_match"], "mean_new_tokens": gen["mean_new_tokens"],
                         "mean_tokens": gen["mean_tokens"], "n_examples": gen["n_examples"]})
            bar.update(1)
    finally:
        model.feedback = trained_feedback
        bar.close()
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| variant | feedback | latents | loss | answer ppl | accuracy | CoT match | # tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {'on' if r['feedback'] else 'off'} | {r['mean_latents']:.2f} | "
                     f"{r['loss']:.4f} | {r['answer_ppl']:.4f} | {r['accuracy']:.4f} | {r['cot_exact_match']:.4f} | "
                     f"{r['mean_tokens']:.2f} |")
    return "\n".join(lines) + "\n"


def ablation_figure(rows: list[dict], title: str):
    fig, (ax_acc, ax_ppl) = new_figure(2, width=max(4.5, 0.9 * len(rows) + 2))
    names = [r["variant"] for r in rows]
    colors = ["tab:blue" if r["variant"] == "full" else "tab:red" if not r["feedback"] else "tab:orange" for r in rows]
    ax_acc.bar(names, [r["accuracy"] for r in rows], color=colors)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_ylabel("accuracy")
    ax_ppl.bar(names, [r["answer_ppl"] for r in rows], color=colors)
    ax_ppl.set_ylabel("answer perplexity")
    for ax in (ax_acc, ax_ppl):
        ax.tick_params(axis="x", rotation=30)
        ax.set_title(title, fontsize=9)
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="coconut-scale ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_common_args(parser)
    parser.add_argument("--fewer", type=int, nargs="*", default=None,
                        help="latent caps to try (default: every count below the stage's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_common_args(args)
    inputs, out = open_inputs(args, "ablations")
    n_latents = max(ex["n_latents"] for ex in inputs.examples)
    if n_latents == 0:
        raise InputError(f"stage {inputs.stage} prompts hold no latents; there is nothing to ablate (use --stage >= 1)")
    rows = run_ablations(inputs, make_variants(n_latents, args.fewer), args.batch_size, args.max_new_tokens)
    report = {"checkpoint": str(inputs.checkpoint), "data": str(inputs.data), "stage": inputs.stage,
              "mode": inputs.curriculum.mode, "n_latents": n_latents, "world_size": dist.world_size(), "rows": rows}
    table = markdown_table(rows)
    if dist.is_main():
        write_json_atomic(out / "ablations.json", report)
        write_text_atomic(out / "ablations.md", f"Ablations: {inputs.checkpoint} on {inputs.data}, stage {inputs.stage}\n\n"
                   + table)
        save_png(ablation_figure(rows, f"{inputs.checkpoint.name}, stage {inputs.stage}"), out / "ablations.png")
    say(table + f"-> {out}")
    dist.finish()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
