"""Latent probing: what each continuous thought decodes to under the language-model head.

    python -m coconut_scale.evaluate.probing CHECKPOINT DATA [--stage K] [--top-k 5] [--batch-size B]
        [--max-examples N] [--out DIR]

The k-th continuous thought of an example is the last hidden state that the model feeds into its k-th latent
(the state at the position just before that latent). Its next-token distribution under the lm_head is the
logits row at that position, so no extra forward is needed. The paper (sec. 5) reads these distributions as a
search: a thought spreads probability over several "frontier" nodes of the reasoning graph at once.

For ProsQA-style records (with idx_to_symbol, edges, root, target, neg_target), each thought also gets the
probability mass on the graph's node names: a name counts by the probability of its first token written as in
the text (" " + name), as the paper does for multi-token concepts; names sharing a first token share its mass,
and every mass counts each token once. Per latent step k (0-based):
    graph        all node names of this example's graph
    frontier     the nodes exactly k+1 edges from the root (what a breadth-first search reaches at step k)
    target       the correct option; neg_target the wrong one
Outputs in --out (default runs/<name>/eval/<export>/probing-stage<K>/):
    probing.json   per latent step: mean top-1 probability, entropy, masses; the most frequent top-1 tokens
    probes.jsonl   per example and thought: top-k tokens with probabilities, entropy, masses, top graph nodes
    probing.png    mean masses and top-1 probability per latent step
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, deque

import torch

from coconut_scale import distributed as dist
from coconut_scale.evaluate.inputs import add_common_args, check_common_args, open_inputs
from coconut_scale.atomic_files import write_json_atomic, write_jsonl_atomic
from coconut_scale.errors import run_cli
from coconut_scale.evaluate.runtime import (
    InputError,
    new_figure,
    progress,
    save_png,
    say,
)
from coconut_scale.data.collate import LatentAlignedCollator

GRAPH_KEYS = ("idx_to_symbol", "edges", "root")
MASSES = ("graph", "frontier", "target", "neg_target")


def is_graph_record(record: dict) -> bool:
    return all(k in record for k in GRAPH_KEYS)


def hop_distances(n_nodes: int, edges: list, root: int) -> list[int | None]:
    """Edges from the root to each node (None: unreachable)."""
    adj: dict[int, list[int]] = {i: [] for i in range(n_nodes)}
    for u, v in edges:
        adj[int(u)].append(int(v))
    dist_ = [None] * n_nodes
    dist_[root] = 0
    queue = deque([root])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if dist_[v] is None:
                dist_[v] = dist_[u] + 1
                queue.append(v)
    return dist_


def first_token(tokenizer, name: str) -> int:
    ids = tokenizer.encode(" " + name, add_special_tokens=False)
    if not ids:
        raise InputError(f"graph node name {name!r} tokenizes to nothing")
    return ids[0]


def graph_masses(probs: torch.Tensor, record: dict, step: int, tokenizer, index: int) -> dict:
    """Probability masses of one thought (`probs` over the vocabulary) on the record's graph nodes."""
    names = record["idx_to_symbol"]
    try:
        hops = hop_distances(len(names), record["edges"], int(record["root"]))
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise InputError(f"record {index}: malformed graph fields (idx_to_symbol/edges/root): {e}") from None
    first = [first_token(tokenizer, n) for n in names]

    def mass(nodes) -> float:
        return float(sum(probs[t] for t in {first[i] for i in nodes}))

    out = {"graph": mass(range(len(names))), "frontier": mass(i for i, h in enumerate(hops) if h == step + 1)}
    for key in ("target", "neg_target"):
        if key in record:
            out[key] = float(probs[first[int(record[key])]])
    ranked = sorted(range(len(names)), key=lambda i: -float(probs[first[i]]))[:5]
    out["top_nodes"] = [{"name": names[i], "prob": float(probs[first[i]]), "hops": hops[i]} for i in ranked]
    return out


@torch.no_grad()
def probe_examples(inputs, top_k: int, batch_size: int) -> list[dict]:
    """This rank's shard of probes, gathered on every rank in example order."""
    model, tokenizer, tokens = inputs.model, inputs.tokenizer, inputs.tokens
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    order = list(range(dist.rank(), len(inputs.examples), dist.world_size()))
    bar = progress(math.ceil(len(order) / batch_size), "probing")
    rows = []
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        batch = collate([{"input_ids": inputs.examples[i]["input_ids"]} for i in chunk])
        ids = batch["input_ids"].to(dist.device())
        mask, pos_ids = batch["attention_mask"].to(ids.device), batch["position_ids"].to(ids.device)
        logits = model(ids, mask, position_ids=pos_ids).logits
        for row, i in enumerate(chunk):
            ex, record = inputs.examples[i], inputs.records[i]
            positions = (ids[row] == tokens.latent_id).nonzero().flatten().tolist()
            thoughts = []
            for step, pos in enumerate(positions):
                probs = torch.softmax(logits[row, pos - 1].float(), dim=-1).cpu()
                top = torch.topk(probs, min(top_k, probs.numel()))
                entry = {"step": step, "entropy": float(-(probs * probs.clamp_min(1e-30).log()).sum()),
                         "top": [{"id": int(t), "token": tokenizer.decode([int(t)]), "prob": float(p)}
                                 for p, t in zip(top.values, top.indices)]}
                if is_graph_record(record):
                    entry.update(graph_masses(probs, record, step, tokenizer, ex["idx"]))
                thoughts.append(entry)
            rows.append({"idx": ex["idx"], "answer": ex.get("answer"), "n_latents": len(positions),
                         "thoughts": thoughts})
        bar.update(1)
    bar.close()
    return sorted((r for part in dist.gather_objects(rows) for r in part), key=lambda r: r["idx"])


def summarize(rows: list[dict]) -> list[dict]:
    """Means per latent step over the examples that have that step (and graph fields, for the masses)."""
    n_steps = max((r["n_latents"] for r in rows), default=0)
    steps = []
    for k in range(n_steps):
        thoughts = [r["thoughts"][k] for r in rows if r["n_latents"] > k]
        summary = {"step": k, "n_examples": len(thoughts),
                   "mean_top1_prob": sum(t["top"][0]["prob"] for t in thoughts) / len(thoughts),
                   "mean_entropy": sum(t["entropy"] for t in thoughts) / len(thoughts),
                   "most_common_top1": [{"token": tok, "count": c} for tok, c in
                                        Counter(t["top"][0]["token"] for t in thoughts).most_common(5)]}
        for key in MASSES:
            vals = [t[key] for t in thoughts if key in t]
            if vals:
                summary[f"mean_{key}_mass"] = sum(vals) / len(vals)
        steps.append(summary)
    return steps


def probing_figure(steps: list[dict], title: str):
    fig, (ax,) = new_figure(1)
    x = [s["step"] for s in steps]
    ax.plot(x, [s["mean_top1_prob"] for s in steps], marker="o", color="black", label="top-1 token")
    for key in MASSES:
        if all(f"mean_{key}_mass" in s for s in steps):
            ax.plot(x, [s[f"mean_{key}_mass"] for s in steps], marker="o", label=f"{key} nodes" if key in
                    ("graph", "frontier") else key)
    ax.set_xticks(x)
    ax.set_xlabel("continuous thought (0-based latent index)")
    ax.set_ylabel("mean probability")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="coconut-scale probing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_common_args(parser)
    parser.add_argument("--top-k", type=int, default=5, help="tokens listed per thought")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_common_args(args)
    if args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")
    inputs, out = open_inputs(args, "probing")
    if not inputs.model.feedback:
        raise InputError(f"{inputs.checkpoint}: mode {inputs.curriculum.mode!r} has no continuous thoughts to probe")
    if max(ex["n_latents"] for ex in inputs.examples) == 0:
        raise InputError(f"stage {inputs.stage} prompts hold no latents; there are no thoughts to probe (--stage >= 1)")
    rows = probe_examples(inputs, args.top_k, args.batch_size)
    steps = summarize(rows)
    report = {"checkpoint": str(inputs.checkpoint), "data": str(inputs.data), "stage": inputs.stage,
              "top_k": args.top_k, "n_examples": len(rows), "graph_records": sum(is_graph_record(r) for r in
                                                                                  inputs.records), "steps": steps}
    if dist.is_main():
        write_json_atomic(out / "probing.json", report)
        write_jsonl_atomic(out / "probes.jsonl", rows)
        save_png(probing_figure(steps, f"{inputs.checkpoint.name}, stage {inputs.stage}"), out / "probing.png")
    for s in steps:
        masses = "  ".join(f"{k} {s[f'mean_{k}_mass']:.3f}" for k in MASSES if f"mean_{k}_mass" in s)
        say(f"thought {s['step']}: top-1 {s['mean_top1_prob']:.3f}  entropy {s['mean_entropy']:.3f}  {masses}  "
            f"most common top-1 {[t['token'] for t in s['most_common_top1'][:3]]}")
    say(f"-> {out}")
    dist.finish()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
