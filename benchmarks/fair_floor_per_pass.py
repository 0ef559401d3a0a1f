"""What one more latent pass costs: Coconut's step at 0, 2, 4 and 6 latents per row over the same tokens (CPU).

bench_fair_floor's batches keep their padded width (200) whatever the latent count, so each extra latent turns a
question token into a one-column pass: the slope of the step's CPU time over the passes is the marginal price of
a latent pass beyond what the floor pays for the same token (at 0 latents Coconut runs one pass, the floor's
work). Run at width 512 and at width 64 (matmuls nearly free), the difference of the two slopes is the part of
a pass's price that grows with the width; the width-64 slope is the part that does not (module calls, autograd
nodes, masks, small ops).

Each latent count is its own model and batch (the same seed); rounds alternate the order; CPU time
(`time.process_time`, one thread); the floor of the 6-latent batch is timed in every round beside them. The
slope is a least-squares fit over the four counts, per round (their median: a slow round moves every count)
and over each count's fastest round.

    python benchmarks/fair_floor_per_pass.py --width 512 --rounds 7    # -> results/fair_floor_per_pass_512.json
    python benchmarks/fair_floor_per_pass.py --width 64 --rounds 15    # -> results/fair_floor_per_pass_64.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fair_floor import REPO, SHAPES, Steps  # noqa: E402

from coconut_scale.atomic_files import write_json_atomic  # noqa: E402
from coconut_scale.train.cpu_malloc import tune_cpu_malloc  # noqa: E402

LATENTS = (0, 2, 4, 6)


def passes(latents: int) -> int:
    """The prefix, one pass per latent but the last, and the pass the last latent opens (one pass at 0)."""
    return latents + 1


def least_squares_slope(x: list[float], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=512,
                   help="the width of one of bench_fair_floor's Llama shapes (512, 64)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or REPO / "benchmarks" / "results" / f"fair_floor_per_pass_{args.width}.json"
    malloc_line = tune_cpu_malloc(True, environ={})
    torch.set_num_threads(1)
    shape = next((s for s in SHAPES if s.arch == "llama" and s.hidden == args.width), None)
    if shape is None:
        p.error(f"--width {args.width}: bench_fair_floor's Llama shapes have widths "
                f"{[s.hidden for s in SHAPES if s.arch == 'llama']}")
    steps = {k: Steps(replace(shape, name=f"{shape.name}, {k} latents", latents=k), None) for k in LATENTS}
    names = [f"coconut {k} latents" for k in LATENTS] + ["floor"]
    runs = {name: (lambda k=k: steps[k].run("coconut")) for name, k in zip(names, LATENTS)}
    runs["floor"] = lambda: steps[LATENTS[-1]].run("floor")
    load_before = os.getloadavg()
    for run in runs.values():  # warm-up
        run()
    cpu = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.process_time()
            runs[name]()
            cpu[name].append(time.process_time() - start)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {cpu[n][-1]:.3f}s" for n in names),
              file=sys.stderr, flush=True)
    medians = {n: statistics.median(ts) for n, ts in cpu.items()}
    fastest = {n: min(ts) for n, ts in cpu.items()}
    x = [passes(k) for k in LATENTS]
    per_round = [least_squares_slope(x, [cpu[n][r] for n in names[:-1]]) for r in range(args.rounds)]
    slope = {"median_of_rounds_ms": statistics.median(per_round) * 1e3,
             "fastest_ms": least_squares_slope(x, [fastest[n] for n in names[:-1]]) * 1e3,
             "per_round_ms": [s * 1e3 for s in per_round]}
    cells = " | ".join(f"{medians[n] * 1e3:.0f} / {fastest[n] * 1e3:.0f}" for n in names)
    table = "\n".join([
        "| CPU ms, median / fastest | " + " | ".join(names) + " | per extra pass |",
        "|---|" + "---:|" * (len(names) + 1),
        f"| {shape.name} | {cells} | {slope['median_of_rounds_ms']:.1f} / {slope['fastest_ms']:.1f} |"])
    print(table)
    write_json_atomic(out, {
        "benchmark": "fair_floor_per_pass",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "malloc": malloc_line, "width": args.width, "rounds": args.rounds,
        "cpu_times_s": cpu, "medians_s": medians, "fastest_s": fastest,
        "slope_per_extra_pass": slope, "table_markdown": table,
        "method": "CPU s of one train step per latent count; the slope over the passes (latents + 1) by least squares, "
                  "per round (its median) and over each count's fastest round"})


if __name__ == "__main__":
    main()
