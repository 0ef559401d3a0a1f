"""Training curves from a run's metrics.jsonl (written by coconut_scale.train.run_log during training).

    python -m coconut_scale.evaluate.curves RUN_DIR_OR_METRICS_JSONL [--out DIR]

Reads the "train" lines (global_step, epoch, stage, loss, tokens_per_s, ...) and the "eval" lines (epoch,
stage, val_loss, accuracy, cot_exact_match, ...). A run resumed after a crash logs some steps twice: the last
line for a step (or an epoch's eval) wins. Outputs in --out (default RUN_DIR/curves/):
    curves.json   stage boundaries, per-stage summary (steps, first/last loss, mean tokens/s), eval per epoch,
                  best epoch
    curves.png    training loss per step with stage boundaries marked (validation loss at each eval), eval
                  accuracy and CoT exact match per epoch, tokens/s per step
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coconut_scale.atomic_files import write_json_atomic
from coconut_scale.errors import run_cli
from coconut_scale.evaluate.runtime import InputError, new_figure, save_png

TRAIN_FIELDS = ("global_step", "stage", "loss")
EVAL_FIELDS = ("epoch",)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records by step, eval records by epoch), deduplicated, last line wins; errors name file and line."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {lineno}: invalid JSON (column {e.colno}): {e.msg}") from None
        if not isinstance(rec, dict) or "kind" not in rec:
            raise InputError(f"{path}: line {lineno}: expected an object with a 'kind' field")
        fields, table, key = {"train": (TRAIN_FIELDS, train, "global_step"),
                              "eval": (EVAL_FIELDS, evals, "epoch")}.get(rec["kind"], (None, None, None))
        if fields is None:
            continue  # other kinds (future additions) are not plotted
        for f in fields:
            if not isinstance(rec.get(f), (int, float)) or isinstance(rec.get(f), bool):
                raise InputError(f"{path}: line {lineno}: {rec['kind']} record lacks a numeric {f!r}")
        table[int(rec[key])] = rec
    if not train:
        raise InputError(f"{path}: no 'train' records")
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def stage_summary(train: list[dict]) -> tuple[list[dict], list[dict]]:
    """Stage boundaries (after the last logged step of each stage but the final one) and per-stage stats."""
    stages, boundaries = [], []
    for rec in train:
        if not stages or stages[-1]["stage"] != rec["stage"]:
            if stages:
                boundaries.append({"after_step": stages[-1]["last_step"], "from_stage": stages[-1]["stage"],
                                   "to_stage": rec["stage"]})
            stages.append({"stage": rec["stage"], "first_step": rec["global_step"], "first_loss": rec["loss"],
                           "_tok": []})
        s = stages[-1]
        s["last_step"], s["last_loss"] = rec["global_step"], rec["loss"]
        if isinstance(rec.get("tokens_per_s"), (int, float)):
            s["_tok"].append(rec["tokens_per_s"])
    for s in stages:
        tok = s.pop("_tok")
        s["mean_tokens_per_s"] = sum(tok) / len(tok) if tok else None
    return boundaries, stages


def summarize(train: list[dict], evals: list[dict]) -> dict:
    boundaries, stages = stage_summary(train)
    keys = ("epoch", "stage", "global_step", "val_loss", "accuracy", "cot_exact_match", "mean_new_tokens",
            "mean_latents")
    eval_rows = [{k: e[k] for k in keys if k in e} for e in evals]
    scored = [e for e in eval_rows if isinstance(e.get("accuracy"), (int, float))]
    best = max(scored, key=lambda e: e["accuracy"], default=None)  # first of equals, as training picks "best"
    return {"n_train_points": len(train), "last_step": train[-1]["global_step"], "stage_boundaries": boundaries,
            "stages": stages, "eval": eval_rows, "best_epoch": best["epoch"] if best else None,
            "best_accuracy": best["accuracy"] if best else None}


def curves_figure(train: list[dict], evals: list[dict], summary: dict, title: str):
    fig, (ax_loss, ax_acc, ax_tok) = new_figure(3, width=5.0)
    steps = [r["global_step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], color="tab:blue", label="train loss")
    val = [(e["global_step"], e["val_loss"]) for e in evals if "global_step" in e and "val_loss" in e]
    if val:
        ax_loss.plot(*zip(*val), "o", color="tab:orange", label="validation loss")
    ax_tok.plot(steps, [r.get("tokens_per_s", float("nan")) for r in train], color="tab:green")
    for b in summary["stage_boundaries"]:
        for ax in (ax_loss, ax_tok):
            ax.axvline(b["after_step"], color="gray", linestyle="--", linewidth=1)
        ax_loss.annotate(f"stage {b['to_stage']}", (b["after_step"], 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")
    ax_loss.set_xlabel("global step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title(title, fontsize=9)
    acc = [e for e in evals if "accuracy" in e]
    if acc:
        epochs = [e["epoch"] for e in acc]
        ax_acc.plot(epochs, [e["accuracy"] for e in acc], marker="o", label="accuracy")
        if all("cot_exact_match" in e for e in acc):
            ax_acc.plot(epochs, [e["cot_exact_match"] for e in acc], marker="s", label="CoT exact match")
        ax_acc.set_xticks(epochs)
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no generation eval logged", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("eval")
    ax_tok.set_xlabel("global step")
    ax_tok.set_ylabel("tokens/s (all ranks)")
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="coconut-scale curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("run", help="a run directory (holding metrics.jsonl) or the metrics.jsonl file")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/curves)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    if not run.exists():
        raise InputError(f"{run} does not exist")
    path = run / "metrics.jsonl" if run.is_dir() else run
    out = Path(args.out) if args.out else path.parent / "curves"
    train, evals = read_metrics(path)
    summary = {"metrics": str(path), **summarize(train, evals)}
    write_json_atomic(out / "curves.json", summary)
    save_png(curves_figure(train, evals, summary, str(path.parent.name)), out / "curves.png")
    print(f"{len(train)} train points, {len(summary['stages'])} stages, {len(evals)} evals; best accuracy "
          f"{summary['best_accuracy']} (epoch {summary['best_epoch']}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
