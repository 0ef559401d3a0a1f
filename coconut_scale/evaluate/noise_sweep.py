"""Noise robustness of continuous thoughts: accuracy when the fed-back hidden states are perturbed.

    python -m coconut_scale.evaluate.noise_sweep CHECKPOINT DATA [--stage K] [--kinds gaussian snr ...]
        [--scales KIND=v1,v2,...] [--passes all each] [--seed S] [--batch-size B] [--max-examples N] [--out DIR]

Cells are (noise kind, scale, latent passes): "all" perturbs every continuous thought, "k" only the k-th
(0-based) of each example. The kinds and what `scale` means are those of coconut_scale.model.perturb (gaussian:
absolute sigma; gaussian_scaled, orthogonal, targeted: relative to |h|; snr: dB, higher is cleaner; uniform:
half-width). Each cell also reports what was actually added, measured on the states the model fed back
(mean |noise|/|h|, rms noise per coordinate, SNR in dB, cosine to h), so the kinds can be compared on one axis.

Outputs in --out (default runs/<name>/eval/<export>/noise_sweep-stage<K>/):
    noise_sweep.json   clean accuracy and one entry per cell: accuracy, drop vs clean, measured noise statistics
    noise_sweep.png    accuracy against measured relative noise |noise|/|h|, one line per kind, one panel per
                       passes setting (the clean accuracy dashed)
Random noise is drawn per latent pass for a whole batch, so noisy accuracies depend (slightly) on how examples
are batched: compare cells at the same --batch-size and world size.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from coconut_scale import distributed as dist
from coconut_scale.evaluate.inputs import add_common_args, check_common_args, open_inputs
from coconut_scale.atomic_files import write_json_atomic
from coconut_scale.errors import run_cli
from coconut_scale.evaluate.runtime import (
    InputError,
    new_figure,
    progress,
    save_png,
    say,
)
from coconut_scale.evaluate.generation import generate_and_score
from coconut_scale.model.perturb import NOISE_KINDS, Perturbation

# Chosen so each kind spans roughly |noise|/|h| = 0.1 .. 3 on layer-normed states (rms ~ 1 per coordinate).
DEFAULT_SCALES = {
    "gaussian": (0.1, 0.3, 1.0, 3.0),
    "gaussian_scaled": (0.1, 0.3, 1.0, 3.0),
    "snr": (20.0, 10.0, 0.0, -10.0),
    "uniform": (0.2, 0.5, 1.7, 5.0),
    "orthogonal": (0.1, 0.3, 1.0, 3.0),
    "targeted": (0.1, 0.3, 1.0, 3.0),
}


class NoiseRecorder:
    """Stands in for a Perturbation inside the model and measures what it actually added to each state.

    Sums (not means) are kept so that ranks can add theirs; `enabled` is switched off for a short shard's
    filler batches, whose outputs are discarded.
    """

    SUMS = ("n_states", "rel_norm", "noise_norm", "state_norm", "noise_rms", "snr_db", "cos")

    def __init__(self, perturbation: Perturbation):
        self.perturbation = perturbation
        self.enabled = True
        self.sums = dict.fromkeys(self.SUMS, 0.0)
        self.max_abs_cos = 0.0
        self.max_abs_coord = 0.0

    def __call__(self, hidden: torch.Tensor, latent_index: int, row_keys: list[int] | None = None) -> torch.Tensor:
        out = self.perturbation(hidden, latent_index, row_keys=row_keys)
        if self.enabled and self.perturbation.applies_to(latent_index):
            h, noise = hidden.float(), out.float() - hidden.float()
            h_norm, n_norm = h.norm(dim=-1), noise.norm(dim=-1)
            cos = (noise * h).sum(-1) / (n_norm * h_norm).clamp_min(1e-30)
            snr = 10 * torch.log10(h.pow(2).mean(-1) / noise.pow(2).mean(-1).clamp_min(1e-30))
            self.sums["n_states"] += h.shape[0]
            self.sums["rel_norm"] += float((n_norm / h_norm.clamp_min(1e-30)).sum())
            self.sums["noise_norm"] += float(n_norm.sum())
            self.sums["state_norm"] += float(h_norm.sum())
            self.sums["noise_rms"] += float((n_norm / math.sqrt(h.shape[-1])).sum())
            self.sums["snr_db"] += float(snr.sum())
            self.sums["cos"] += float(cos.sum())
            self.max_abs_cos = max(self.max_abs_cos, float(cos.abs().max()))
            self.max_abs_coord = max(self.max_abs_coord, float(noise.abs().max()))
        return out

    def batch_hook(self, batch, is_filler: bool) -> None:
        self.enabled = not is_filler

    def summary(self) -> dict:
        """Means over every perturbed state of every rank (collective)."""
        totals = dict(zip(self.SUMS, dist.all_reduce_sum([self.sums[k] for k in self.SUMS])))
        maxima = dist.gather_objects((self.max_abs_cos, self.max_abs_coord))
        n = totals.pop("n_states")
        means = {f"mean_{k}": v / max(n, 1.0) for k, v in totals.items()}
        return {"n_states": int(n), **means, "max_abs_cos": max(m[0] for m in maxima),
                "max_abs_coord": max(m[1] for m in maxima)}


def parse_scales(specs: list[str], kinds: list[str]) -> dict[str, tuple[float, ...]]:
    scales = {k: DEFAULT_SCALES[k] for k in kinds}
    for spec in specs:
        kind, sep, values = spec.partition("=")
        if not sep or kind not in NOISE_KINDS:
            raise InputError(f"--scales {spec!r}: expected KIND=v1,v2,... with KIND one of {NOISE_KINDS}")
        try:
            scales[kind] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise InputError(f"--scales {spec!r}: the values must be numbers") from None
        if not scales[kind]:
            raise InputError(f"--scales {spec!r}: no values")
        if kind not in kinds:
            raise InputError(f"--scales {spec!r}: {kind} is not among --kinds {kinds}")
    return scales


def pass_settings(passes: list[str], n_latents: int) -> list[tuple[str, tuple[int, ...] | None]]:
    """("all", None) and/or one ("k", (k,)) per latent index."""
    out: list[tuple[str, tuple[int, ...] | None]] = []
    for p in passes:
        if p == "all":
            out.append(("all", None))
        elif p == "each":
            out.extend((str(k), (k,)) for k in range(n_latents))
        elif p.isdigit():
            if int(p) >= n_latents:
                raise InputError(f"--passes {p}: the examples have at most {n_latents} latents (0-based index)")
            out.append((p, (int(p),)))
        else:
            raise InputError(f"--passes {p!r}: expected 'all', 'each' or a latent index")
    return list(dict.fromkeys(out))


def run_sweep(inputs, kinds, scales, passes, seed, batch_size, max_new_tokens) -> dict:
    model = inputs.model
    if not model.feedback:
        raise InputError(f"{inputs.checkpoint}: mode {inputs.curriculum.mode!r} feeds no hidden states back; "
                         "there is nothing to perturb")
    n_latents = max(ex["n_latents"] for ex in inputs.examples)
    if n_latents == 0:
        raise InputError(f"stage {inputs.stage} prompts hold no latents; choose a stage >= 1 (--stage)")
    settings = pass_settings(passes, n_latents)
    cells = [(k, s, name, idx) for k in kinds for s in scales[k] for name, idx in settings]
    bar = progress(len(cells) + 1, "noise sweep")

    def evaluate(recorder=None) -> dict:
        model.perturbation = recorder
        try:
            result = generate_and_score(model, inputs.examples, inputs.tokenizer, batch_size, max_new_tokens,
                                        dist.device(), batch_hook=recorder.batch_hook if recorder else None)
        finally:
            model.perturbation = None
        bar.update(1)
        return result

    clean = evaluate()
    out_cells = []
    for kind, scale, name, idx in cells:
        recorder = NoiseRecorder(Perturbation(kind, scale, passes=idx, seed=seed))
        result = evaluate(recorder)
        out_cells.append({"kind": kind, "scale": scale, "passes": name, "accuracy": result["accuracy"],
                          "accuracy_drop": clean["accuracy"] - result["accuracy"],
                          "cot_exact_match": result["cot_exact_match"], "mean_new_tokens": result["mean_new_tokens"],
                          "noise": recorder.summary()})
    bar.close()
    return {"clean": {k: v for k, v in clean.items() if k != "rows"}, "cells": out_cells,
            "n_latents": n_latents, "passes": [name for name, _ in settings]}


def sweep_figure(report: dict):
    from matplotlib.ticker import NullFormatter

    passes = report["passes"]
    fig, axes = new_figure(len(passes), width=5.0)
    for ax, name in zip(axes, passes):
        for kind in report["kinds"]:
            cells = sorted((c for c in report["cells"] if c["kind"] == kind and c["passes"] == name),
                           key=lambda c: c["noise"]["mean_rel_norm"])
            if cells:
                ax.plot([max(c["noise"]["mean_rel_norm"], 1e-6) for c in cells], [c["accuracy"] for c in cells],
                        marker="o", label=kind)
        ax.axhline(report["clean"]["accuracy"], color="black", linestyle="--", linewidth=1, label="no noise")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor-tick labels of a short log axis overlap
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("measured |noise| / |h|")
        ax.set_ylabel("accuracy")
        ax.set_title("every continuous thought" if name == "all" else f"continuous thought {name} only", fontsize=10)
    axes[0].legend(fontsize=8)
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="coconut-scale noise-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_common_args(parser)
    parser.add_argument("--kinds", nargs="+", default=list(NOISE_KINDS), choices=NOISE_KINDS)
    parser.add_argument("--scales", nargs="*", default=[], metavar="KIND=v1,v2",
                        help="scales of one kind, replacing its defaults: " +
                        "; ".join(f"{k}={','.join(f'{v:g}' for v in vs)}" for k, vs in DEFAULT_SCALES.items()))
    parser.add_argument("--passes", nargs="+", default=["all", "each"],
                        help="'all' (every latent), 'each' (one cell per latent index), or latent indices")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_common_args(args)
    kinds = list(dict.fromkeys(args.kinds))
    scales = parse_scales(args.scales, kinds)
    inputs, out = open_inputs(args, "noise_sweep")
    sweep = run_sweep(inputs, kinds, scales, args.passes, args.seed, args.batch_size, args.max_new_tokens)
    report = {"checkpoint": str(inputs.checkpoint), "data": str(inputs.data), "stage": inputs.stage,
              "kinds": kinds, "scales": {k: list(v) for k, v in scales.items()}, "seed": args.seed,
              "batch_size": args.batch_size, "world_size": dist.world_size(), **sweep}
    if dist.is_main():
        write_json_atomic(out / "noise_sweep.json", report)
        save_png(sweep_figure(report), out / "noise_sweep.png")
    say(f"noise sweep, stage {inputs.stage}: clean accuracy {report['clean']['accuracy']:.4f}, "
        f"{len(report['cells'])} cells -> {out}")
    for cell in report["cells"]:
        say(f"  {cell['kind']:>16} scale {cell['scale']:>6g} passes {cell['passes']:>3}: accuracy "
            f"{cell['accuracy']:.4f}  |noise|/|h| {cell['noise']['mean_rel_norm']:.3f}")
    dist.finish()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
