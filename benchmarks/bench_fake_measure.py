"""Every shipped recipe's step executed on fake tensors at its real shape (`coconut-scale check --measure`), beside
the estimate: a table per recipe and world size, and JSON with every figure.

    python benchmarks/bench_fake_measure.py                        # every recipe in recipes/ -> results/fake_measure.json
    python benchmarks/bench_fake_measure.py recipes/qwen3_4b_gsm.yaml --out /tmp/q.json
    python benchmarks/bench_fake_measure.py --markdown             # also prints docs/memory.md's table

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
from coconut_scale.config.measured_memory import measure_recipe, micro_batches, world_size_rows  # noqa: E402
from coconut_scale.config.recipe import load_recipe  # noqa: E402


def load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: timings swing with them)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def markdown(results: list[dict]) -> str:
    lines = ["| recipe | GPUs | micro x accum | ZeRO | estimate GiB | fake-measured GiB (phase) | estimate / measured | "
             "DeepSpeed model states GiB (measured) | tokens/s/GPU at 40% MFU | ZeRO-3 floor s/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for r in res["rows"]:
            ds = "-" if r["deepspeed_model_states"] is None else f"{r['deepspeed_model_states']:.1f}"
            floor = "-" if r["zero3_floor_s"] is None else f"{r['zero3_floor_s']:.1f}"
            lines.append(
                f"| {res['recipe']} | {r['world_size']} | {r['micro_batch']} x {r['grad_accum']} | {r['zero_stage']} | "
                f"{r['estimate']['total']:.1f} ({r['estimate_executed']:.1f} + {r['estimate']['total'] - r['estimate_executed']:.1f}) | "
                f"{r['measured_total']:.1f} ({r['peak_phase']}) | {r['estimate_executed'] / r['measured_total']:.2f} | "
                f"{ds} ({r['measured_model_states']:.1f}) | {r['tokens_per_s']:,.0f} | {floor} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe files (default: every recipes/*.yaml)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fake_measure.json"))
    parser.add_argument("--markdown", action="store_true", help="print the table of docs/memory.md")
    args = parser.parse_args(argv)
    paths = args.recipes or sorted(str(p) for p in (REPO / "recipes").glob("*.yaml"))
    results, failures = [], []
    for path in paths:
        recipe = load_recipe(path)
        before, start = load(), time.perf_counter()
        m = measure_recipe(recipe, micro_batches(recipe, recipe.batch.world_sizes).values())
        rows = world_size_rows(recipe, m, recipe.batch.world_sizes,
                               lambda params, largest, ws, stage: states_estimate(recipe, m, ws, stage))
        seconds = time.perf_counter() - start
        print(f"=== {path} ({seconds:.0f} s, load {before} -> {load()})")
        for line in describe(recipe, m, rows):
            print(line)
        for r in rows:
            if not r.within_tolerance() or r.measured_total + ALLOWANCE_GIB > recipe.gpu_memory_gb:
                failures.append(f"{recipe.name} at {r.world_size} GPU(s)")
        points = m.points
        m.points = {}
        results.append({"recipe": recipe.name, "path": str(Path(path).relative_to(REPO)) if Path(path).is_absolute()
                        else path, "seconds": seconds, "load_before": before, "load_after": load(),
                        "measurement": asdict(m), "points": points, "rows": [
                            {**asdict(r), "activation_error": r.activation_error, "total_error": r.total_error}
                            for r in rows]})
        print(flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=1, default=str))
    print(f"wrote {args.out}")
    if args.markdown:
        print(markdown(results))
    if failures:
        print("outside tolerance or not fitting: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
