"""Coconut's train step against its fair floor: the same decoder body and the same loss on the same tokens (CPU).

bench_overhead.py compares Coconut with HF's own step, which pays for full [B, T, V] logits that Coconut's
chunked/fused loss never builds. Here the yardstick is the floor Coconut could reach: the same model, through the
same wrapper with `feedback=False` (latents are then ordinary tokens, one pass over the whole sequence), so the
decoder body runs once over the same T tokens and the loss is the project's own chunked/fused one
(chunked_loss.py) on the same hidden states and labels. The two steps differ only by the latent passes: the
cut into one pass per latent column, the carried K/V, the fill.

  variants:  floor (feedback=False) and coconut (6 latents per row, one pass per latent); with --compare-rev REV
             also `before`, the Coconut wrapper as the package was at REV (bench_overhead.coconut_class_at), so
             before/after come from one interleaved run. Each with checkpointing off and on (the harness's
             latent-safe layer checkpointing, for the floor too).
  shapes:    GPT-2-small (12 x 768, batch 8 x 200), a Llama-shaped decoder (8 x 512, GQA, SwiGLU, RMSNorm,
             batch 8 x 200, vocab 32000) and the same at width 64 (vocab 1000), where what is left of the
             difference is the per-pass cost that does not grow with the width.
  --malloc:  cpu (default) sets glibc malloc as a CPU training run does (train/cpu_malloc.py: no per-allocation mmap,
             no heap trim), default keeps glibc's; both runs one child per setting at the same time and merges their
             results into one JSON ("runs"). Minor page faults per step are recorded beside the times.
  --profile: torch.profiler over --profile-steps interleaved steps (4) of floor and of coconut (and before, with
             --compare-rev) on the first shape, with --checkpointing off or on; prints, as means per step, the top
             tables, the ops whose self CPU time differs most from the floor's (where the latent passes' cost sits)
             and, with before, between before and coconut (what the change moved), and each variant's matmul time
             split by kind (matmul_split).

Timing: one warm-up per variant (its loss is recorded: coconut and before must agree), then rounds in which the
variants run back to back in alternating order; medians and the median of the per-round ratios to the floor, of
wall time and of the process's CPU time (with one thread, the step's own work: on a shared machine wall time
also counts the waits for a core), and the best round's ratio (fastest Coconut step over fastest floor step:
interference from other work only adds time, so the minima are the steadiest figure of a loaded machine). The
load averages are recorded before and after.

    python benchmarks/bench_fair_floor.py --quick                      # tiny shapes, < 1 min
    python benchmarks/bench_fair_floor.py --threads 1 --repeats 5 --malloc both  # -> results/bench_fair_floor.json
    python benchmarks/bench_fair_floor.py --compare-rev main --repeats 5
    python benchmarks/bench_fair_floor.py --profile --checkpointing on --shapes llama
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_overhead import NO_EOS, Shape, build_model, coconut_class_at, load_average, median, train_batch  # noqa: E402

from coconut_scale.atomic_files import write_json_atomic  # noqa: E402
from coconut_scale.model.activation_checkpointing import (  # noqa: E402
    disable_latent_safe_checkpointing,
    enable_latent_safe_checkpointing,
)
from coconut_scale.model.coconut import Coconut  # noqa: E402
from coconut_scale.train.cpu_malloc import tune_cpu_malloc  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_fair_floor.json"
SHAPES = (
    Shape("gpt2-small 12x768", "gpt2", 12, 768, 50257 + 3, 8, 200),
    Shape("llama 8x512", "llama", 8, 512, 32000, 8, 200),
    # The Llama shape at width 64: its matmuls nearly free, what is left of the difference is the per-pass cost
    # that does not grow with the width (each pass's module calls, masks, small ops).
    Shape("narrow llama 8x64", "llama", 8, 64, 1000, 8, 200),
)
QUICK_SHAPES = (Shape("quick gpt2 2x128", "gpt2", 2, 128, 2000, 4, 64, latents=3, answer_len=8),
                Shape("quick llama 2x128", "llama", 2, 128, 2000, 4, 64, latents=3, answer_len=8))


class Steps:
    """One train step (zero_grad, forward, backward) per variant, over one model and one batch."""

    def __init__(self, shape: Shape, compare_rev: str | None):
        self.shape = shape
        self.model, t = build_model(shape)
        self.batch = train_batch(shape, t)
        self.wrappers = {"floor": Coconut(self.model, t.latent_id, t.start_id, t.end_id, NO_EOS, feedback=False),
                         "coconut": Coconut(self.model, t.latent_id, t.start_id, t.end_id, NO_EOS)}
        # Each wrapper's layers are checkpointed by its own package's checkpointing (the recompute must run in that
        # package's deferral of weight gradients, deferred_grad.recompute_context).
        self.checkpointing = {"floor": enable_latent_safe_checkpointing, "coconut": enable_latent_safe_checkpointing}
        if compare_rev:
            before = coconut_class_at(compare_rev)
            self.wrappers["before"] = before(self.model, t.latent_id, t.start_id, t.end_id, NO_EOS)
            package = before.__module__.split(".")[0]
            self.checkpointing["before"] = importlib.import_module(
                f"{package}.model.activation_checkpointing").enable_latent_safe_checkpointing

    def variants(self) -> list[str]:
        return [f"{name}{suffix}" for suffix in ("", "_ckpt") for name in self.wrappers]

    def run(self, variant: str) -> float:
        name = variant.removesuffix("_ckpt")
        disable_latent_safe_checkpointing(self.model)
        if variant.endswith("_ckpt"):
            self.checkpointing[name](self.model)
        wrapper = self.wrappers[name]
        self.model.zero_grad(set_to_none=True)
        loss = wrapper(**self.batch).loss
        loss.backward()
        return float(loss.detach())


def interleaved(steps: Steps, group: list[str], repeats: int, log) -> tuple[dict, dict, dict, dict]:
    """Wall and CPU seconds and minor page faults per round and variant, and each variant's loss (warm-up)."""
    wall, cpu, faults = {v: [] for v in group}, {v: [] for v in group}, {v: [] for v in group}
    losses = {v: steps.run(v) for v in group}  # warm-up
    for r in range(repeats):
        for v in group if r % 2 == 0 else reversed(group):
            t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            steps.run(v)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        log(f"  {steps.shape.name} round {r + 1}/{repeats}: "
            + ", ".join(f"{v} {wall[v][-1]:.2f}s (cpu {cpu[v][-1]:.2f}s, {faults[v][-1]} faults)" for v in group))
    return wall, cpu, faults, losses


def summarise(times: dict[str, list[float]], floor: str) -> list[dict]:
    return [{"variant": v, "median_s": median(ts), "x_floor_medians": median(ts) / median(times[floor]),
             "x_floor_paired": median([a / b for a, b in zip(ts, times[floor])]),
             "x_floor_best": min(ts) / min(times[floor])} for v, ts in times.items()]


def profile_difference(steps: Steps, rows: int, suffix: str = "", steps_per_variant: int = 1) -> str:
    """Top self-CPU ops of each variant (checkpointing on with suffix "_ckpt"), and the ops whose self CPU time
    differs most from the floor's (and, with a `before` variant, from before's: the lines the change moved).

    Each variant is profiled over `steps_per_variant` steps, interleaved in alternating order, and every figure is
    the mean per step: one step's op times move by tens of percent on a shared CPU (the same 8 loss matmuls have
    measured 711 and 1198 ms in two single-step profiles), call counts not at all."""
    from torch.profiler import ProfilerActivity, profile

    names = [v + suffix for v in ("floor", "before", "coconut") if v in steps.wrappers]
    totals = {v: {} for v in names}
    matmuls = {v: [0.0, 0.0, 0.0] for v in names}
    for variant in names:
        steps.run(variant)  # warm-up
    for r in range(steps_per_variant):
        for variant in names if r % 2 == 0 else names[::-1]:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                steps.run(variant)
            for e in prof.key_averages():
                ms, calls = totals[variant].get(e.key, (0.0, 0.0))
                totals[variant][e.key] = (ms + e.self_cpu_time_total / 1e3 / steps_per_variant,
                                          calls + e.count / steps_per_variant)
            split = matmul_split(variant, prof.key_averages(group_by_input_shape=True), steps.shape.batch)
            matmuls[variant] = [a + b / steps_per_variant for a, b in zip(matmuls[variant], split)]
    per = f"mean of {steps_per_variant} profiled steps" if steps_per_variant > 1 else "one profiled step"
    tables = []
    for variant in names:
        top = sorted(totals[variant].items(), key=lambda kv: -kv[1][0])[:rows]
        all_ms = sum(ms for ms, _ in totals[variant].values())
        tables.append("\n".join([f"## {variant} ({steps.shape.name}), self CPU ms per step ({per})",
                                  "| op | self CPU ms | % | calls |", "|---|---:|---:|---:|",
                                  *(f"| {k} | {ms:.1f} | {100 * ms / all_ms:.1f} | {calls:g} |"
                                    for k, (ms, calls) in top),
                                  f"| **all ops** | {all_ms:.1f} | 100.0 | |"]))
    sections = []
    floor, before, coconut = "floor" + suffix, "before" + suffix, "coconut" + suffix
    for base, other in [(floor, v) for v in names[1:]] + ([(before, coconut)] if before in names else []):
        a, b = totals[base], totals[other]
        keys = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0]))
        lines = [f"## {other} minus {base}, self CPU ms per step ({per}; top ops by difference)",
                 f"| op | {base} ms | {other} ms | difference ms | calls {base} | calls {other} |",
                 "|---|---:|---:|---:|---:|---:|"]
        for k in keys[:rows]:
            (am, ac), (bm, bc) = a.get(k, (0.0, 0)), b.get(k, (0.0, 0))
            lines.append(f"| {k} | {am:.1f} | {bm:.1f} | {bm - am:+.1f} | {ac:g} | {bc:g} |")
        ta, tb = (sum(ms for ms, _ in t.values()) for t in (a, b))
        lines.append(f"| **all ops** | {ta:.1f} | {tb:.1f} | {tb - ta:+.1f} | | |")
        sections.append("\n".join(lines))
    split = ["## Matmul self CPU ms by kind (one-column passes: B-row products; their deferred weight gradients: "
             "products over a multiple of B rows; the rest)",
             "| variant | one-column passes | deferred weight gradients | other matmuls | all ops |",
             "|---|---:|---:|---:|---:|"]
    for variant in names:
        one, deferred, other = matmuls[variant]
        split.append(f"| {variant} | {one:.1f} | {deferred:.1f} | {other:.1f} "
                     f"| {sum(ms for ms, _ in totals[variant].values()):.1f} |")
    return "\n\n".join([*tables, *sections, "\n".join(split)])


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def matmul_split(variant: str, by_shape, rows: int) -> tuple[float, float, float]:
    """Matmul self CPU ms of one profiled step: products whose left operand has `rows` rows (a one-column pass:
    B rows, forward and input gradient), the deferred weight gradients (an inner dimension of k * B, k > 1, with
    neither outer one B: the passes' rows stacked), the rest."""
    one = deferred = other = 0.0
    for e in by_shape:
        if e.key not in MATMULS or not e.input_shapes:
            continue
        a, b = (e.input_shapes[1], e.input_shapes[2]) if e.key.startswith("aten::addmm") else e.input_shapes[:2]
        ms = e.self_cpu_time_total / 1e3
        if len(a) == 2 and a[0] == rows:
            one += ms
        elif (len(a) == 2 and len(b) == 2 and a[1] % rows == 0 and a[1] // rows > 1 and a[1] < 16 * rows
              and rows not in (a[0], b[1])):
            deferred += ms
        else:
            other += ms
    return one, deferred, other


def format_table(timing: dict, cpu: dict, faults: dict) -> str:
    lines = ["| shape | variant | wall s | x floor (medians) | x floor (paired) | CPU s | x floor CPU (medians) "
             "| x floor CPU (paired) | x floor CPU (best) | minor faults |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape_name, rows in timing.items():
        for r, c in zip(rows, cpu[shape_name]):
            f = median(faults[shape_name][r["variant"]])
            lines.append(f"| {shape_name} | {r['variant']} | {r['median_s']:.2f} | {r['x_floor_medians']:.3f}x "
                         f"| {r['x_floor_paired']:.3f}x | {c['median_s']:.2f} | {c['x_floor_medians']:.3f}x "
                         f"| {c['x_floor_paired']:.3f}x | {c['x_floor_best']:.3f}x | {f:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, well under a minute")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up per variant)")
    p.add_argument("--compare-rev", default=None, help="also time the Coconut wrapper of this git revision")
    p.add_argument("--shapes", nargs="+", default=None, metavar="PREFIX", help="only shapes whose name starts so")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    p.add_argument("--profile", action="store_true", help="instead of timing: the profile of the difference")
    p.add_argument("--profile-steps", type=int, default=4,
                   help="with --profile: profiled steps per variant, interleaved; the tables show means per step")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--malloc", choices=["default", "cpu", "both"], default="cpu",
                   help="glibc malloc as a CPU training run sets it (train/cpu_malloc.py), glibc's defaults, or both: "
                        "two child processes at once, one per setting, their results in one JSON")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("bench_fair_floor_quick.json") if args.quick else DEFAULT_OUT
    return args


def both_allocators(args, argv) -> None:
    """One child per malloc setting, run at the same time (the same load for both), merged into args.out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {m: Path(tmp) / f"{m}.json" for m in ("default", "cpu")}
        children = {m: subprocess.Popen([sys.executable, __file__, *argv, "--malloc", m, "--out", str(out)])
                    for m, out in outs.items()}
        failed = {m: rc for m, c in children.items() if (rc := c.wait()) != 0}
        if failed:
            raise SystemExit(f"bench_fair_floor --malloc both: children exited {failed}")
        runs = {m: json.loads(out.read_text()) for m, out in outs.items()}
    for m, run in runs.items():
        print(f"## malloc {m}\n{run['table_markdown']}\n")
    write_json_atomic(args.out, {"benchmark": "bench_fair_floor", "malloc": "both", "runs": runs,
                                 "method": "two processes at once, glibc malloc defaults vs train/cpu_malloc.py's "
                                           "settings; within each, the interleaved rounds below"})


def main(argv=None):
    args = parse_args(argv)
    if args.malloc == "both":
        return both_allocators(args, argv)
    malloc_line = tune_cpu_malloc(True, environ={}) if args.malloc == "cpu" else "malloc: glibc defaults"
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(s for s in shapes if any(s.name.startswith(p) for p in args.shapes))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.profile:
        suffix = {"off": "", "on": "_ckpt"}.get(args.checkpointing)
        if suffix is None:
            raise SystemExit("bench_fair_floor --profile: pass --checkpointing off or on (one profile per run)")
        print(profile_difference(Steps(shapes[0], args.compare_rev), rows=20, suffix=suffix,
                                 steps_per_variant=args.profile_steps))
        return None
    load_before = load_average()
    log(malloc_line)
    timing, cpu_timing, raw, raw_cpu, raw_faults, losses = {}, {}, {}, {}, {}, {}
    for shape in shapes:
        steps = Steps(shape, args.compare_rev)
        raw[shape.name], raw_cpu[shape.name], raw_faults[shape.name], losses[shape.name] = {}, {}, {}, {}
        timing[shape.name], cpu_timing[shape.name] = [], []
        for suffix in {"off": [""], "on": ["_ckpt"], "both": ["", "_ckpt"]}[args.checkpointing]:
            group = [v for v in steps.variants() if v.endswith("_ckpt") == (suffix == "_ckpt")]
            wall, cpu, faults, loss = interleaved(steps, group, args.repeats, log)
            raw_faults[shape.name].update(faults)
            raw[shape.name].update(wall)
            raw_cpu[shape.name].update(cpu)
            losses[shape.name].update(loss)
            timing[shape.name] += summarise(wall, "floor" + suffix)
            cpu_timing[shape.name] += summarise(cpu, "floor" + suffix)
    table = format_table(timing, cpu_timing, raw_faults)
    print(table)
    result = {
        "benchmark": "bench_fair_floor",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_1_5_15": {"before": load_before, "after": load_average()},
        "malloc": malloc_line,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "config": {"quick": args.quick, "repeats": args.repeats, "compare_rev": args.compare_rev,
                   "threads": args.threads, "shapes": [asdict(s) for s in shapes]},
        "environment": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                        "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "method": "floor: the Coconut wrapper with feedback=False (one pass over the same tokens, the same "
                  "chunked/fused loss). 1 warm-up per variant, then rounds alternating the order (A/B/C, C/B/A); "
                  "medians, the median of per-round ratios to the floor of the same checkpointing mode and the ratio "
                  "of the fastest rounds (x_floor_best). CPU: "
                  "time.process_time of the step (one thread: the process's own work, less sensitive to load than "
                  "wall time on a shared machine).",
        "losses": losses, "timings_s": raw, "cpu_times_s": raw_cpu, "minor_faults": raw_faults, "timing": timing, "cpu_timing": cpu_timing,
        "table_markdown": table,
    }
    write_json_atomic(args.out, result)
    log(f"wrote {args.out}; load average before {load_before}, after {result['load_average_1_5_15']['after']}")


if __name__ == "__main__":
    main()
