"""Every shipped recipe's step executed on fake tensors at its real shape (`coconut-scale check --measure`), beside
the estimate: a table per recipe and world size, and JSON with every figure.

    python benchmarks/bench_fake_measure.py                        # every recipe in recipes/ -> results/fake_measure.json
    python benchmarks/bench_fake_measure.py recipes/qwen3_4b_gsm.yaml --out /tmp/q.json
    python benchmarks/bench_fake_measure.py --markdown             # also prints docs/memory.md's table
    python benchmarks/bench_fake_measure.py --reuse results/fake_measure.json   # saved measurements, rows recomputed

Per recipe: the measurement's wall time, the machine's load (/proc/loadavg) before and after, and for every
world size the row of `check --measure` (config/measured_memory.py's WorldSizeRow). Exit code 1 when a recipe's
estimate is outside its tolerance of the measurement or a world size does not fit (the same failures as check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coconut_scale.cli.check_measure import ALLOWANCE_GIB, describe, states_estimate  # noqa: E402
from coconut_scale.config.measured_memory import (RecipeMeasurement, measure_recipe, micro_batches,  # noqa: E402
                                                  world_size_rows)
from coconut_scale.config.recipe import load_recipe  # noqa: E402


def load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: timings swing with them)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def markdown(results: list[dict]) -> str:
    """docs/memory.md's table: per recipe and world size, GiB per GPU."""
    lines = ["| recipe | GPUs | micro x accum | ZeRO | estimate (+ unseen) | fake-measured (phase) | error | "
             "activation side est / measured | DeepSpeed model states (measured) | tokens/s/GPU at 40% MFU | "
             "ZeRO-3 floor s/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for r in res["rows"]:
            ds = "-" if r["deepspeed_model_states"] is None else f"{r['deepspeed_model_states']:.1f}"
            floor = "-" if r["zero3_floor_s"] is None else f"{r['zero3_floor_s']:.1f}"
            unseen = r["estimate"]["total"] - r["estimate_executed"]
            lines.append(
                f"| {res['recipe']} | {r['world_size']} | {r['micro_batch']} x {r['grad_accum']} | {r['zero_stage']} | "
                f"{r['estimate_executed']:.2f} (+ {unseen:.1f}) | {r['measured_total']:.2f} ({r['peak_phase']}) | "
                f"{r['total_error']:+.1%} | {r['estimate_activation_side']:.2f} / {r['measured_activation_side']:.2f} "
                f"({r['activation_error']:+.1%}) | {ds} ({r['measured_model_states']:.1f}) | {r['tokens_per_s']:,.0f} | "
                f"{floor} |")
    return "\n".join(lines)


def measure_one(path: str, reuse: dict | None) -> tuple[dict, list[str]]:
    """One recipe's entry of the JSON (measured, or the saved measurement of `reuse` with the rows recomputed from
    the current estimate) and its failures."""
    recipe = load_recipe(path)
    before, start = load(), time.perf_counter()
    if reuse is not None:
        m = RecipeMeasurement.from_json({**reuse["measurement"], "points": {}})
        points, seconds, before, after = reuse.get("points", {}), reuse["seconds"], reuse["load_before"], reuse["load_after"]
    else:
        m = measure_recipe(recipe, micro_batches(recipe, recipe.batch.world_sizes).values(),
                           log=lambda line: print(line, flush=True))
        points, m.points = m.points, {}
        seconds, after = time.perf_counter() - start, load()
    rows = world_size_rows(recipe, m, recipe.batch.world_sizes,
                           lambda params, largest, ws, stage: states_estimate(recipe, m, ws, stage))
    print(f"=== {path} ({seconds:.0f} s{', reused' if reuse is not None else ''}, load {before} -> {after})")
    for line in describe(recipe, m, rows):
        print(line)
    failures = [f"{recipe.name} at {r.world_size} GPU(s)" for r in rows if not r.within_tolerance()
                or r.measured_total + r.estimate["buffers"] + ALLOWANCE_GIB > recipe.gpu_memory_gb]
    entry = {"recipe": recipe.name, "path": path, "seconds": seconds, "load_before": before, "load_after": after,
             "measurement": m.to_json(), "points": points,
             "rows": [{**asdict(r), "activation_error": r.activation_error, "total_error": r.total_error}
                      for r in rows]}
    print(flush=True)
    return entry, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe files (default: every recipes/*.yaml)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fake_measure.json"))
    parser.add_argument("--reuse", metavar="JSON", help="take the measurements from this earlier output (recipes "
                        "it lacks are measured) and recompute the rows with the current estimate")
    parser.add_argument("--markdown", action="store_true", help="print the table of docs/memory.md")
    args = parser.parse_args(argv)
    paths = [str(Path(p).resolve().relative_to(REPO)) for p in args.recipes] or \
        sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*.yaml"))
    saved = {}
    if args.reuse:
        saved = {e["path"]: e for e in json.loads(Path(args.reuse).read_text())["results"]}
    results, failures = [], []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            entry, failed = measure_one(path, saved.get(path))
        except Exception as e:  # noqa: BLE001 - one recipe's failure must not lose the others' measurements
            print(f"=== {path}: FAILED {type(e).__name__}: {e}", flush=True)
            entry, failed = {"recipe": Path(path).stem, "path": path, "error": f"{type(e).__name__}: {e}"}, [path]
        results.append(entry)
        failures += failed
        out.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=1, default=str))
    print(f"wrote {out}")
    if args.markdown:
        print(markdown([r for r in results if "rows" in r]))
    if failures:
        print("outside tolerance, not fitting or failed: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
