"""CODI against Coconut on CPU, same data, model, batch and epochs, two seeds each: the all-latent accuracy.

Both train the random 2-layer Llama of recipes/tiny_cpu*.yaml from scratch on the same generated arithmetic
problems (two iCoT steps each, numeric answers): Coconut through its curriculum (stages 0, 1, 2 with two epochs
each, ending with both steps latent), CODI with two latents from the start; both are scored at the end with every
step latent (Coconut stage 2, CODI's 2 thoughts). A tiny random model is a check of the methods' mechanics at equal
cost, not a statement about their accuracy at scale (docs/methods.md has the reading).

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/codi_vs_coconut_cpu.py [--seeds 0 1] [--epochs 6]

Prints a table and writes benchmarks/results/codi_vs_coconut_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(method: str, seed: int, epochs: int, out: Path, data: Path) -> dict:
    common = {"output_dir": out, "seed": seed, "optim.epochs": epochs, "optim.lr": 3e-3, "optim.grad_clip": 1.0,
              "data.train_file": data / "train.json", "data.val_file": data / "val.json",
              "data.generate": "{kind: arithmetic_synthetic, n_train: 256, n_val: 64, seed: 0, min_steps: 2, "
                               "max_steps: 2}",
              "batch.global_batch_size": 16, "batch.micro_batch_size": 8, "batch.eval_batch_size": 16,
              "eval.max_new_tokens": 12, "eval.every_epochs": epochs, "logging.log_every_steps": 16,
              "checkpoint.export_hf": "false"}
    if method == "codi":
        recipe = REPO / "recipes" / "tiny_cpu_codi.yaml"
    else:
        recipe = REPO / "recipes" / "tiny_cpu.yaml"
        common.update({"coconut.c_thought": 1, "coconut.max_latent_stage": 2,
                       "coconut.epochs_per_stage": max(1, epochs // 3)})
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "coconut_scale.train", str(recipe),
                           *[f"{k}={v}" for k, v in common.items()]], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    return {"method": method, "seed": seed, "accuracy": final["accuracy"], "val_loss": final["val_loss"],
            "stage": final["stage"], "mean_latents": final["mean_latents"], "n_examples": final["n_examples"],
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--work", default="runs/codi_vs_coconut_cpu")
    args = parser.parse_args()
    work = (REPO / args.work).resolve()
    data = work / "data"
    results = []
    for seed in args.seeds:
        for method in ("coconut", "codi"):
            results.append(run(method, seed, args.epochs, work / f"{method}_seed{seed}", data))
            r = results[-1]
            print(f"{r['method']:8s} seed {r['seed']}: accuracy {r['accuracy']:.3f} (stage {r['stage']}, "
                  f"{r['mean_latents']:.0f} latents, {r['n_examples']} questions), val_loss {r['val_loss']:.3f}, "
                  f"{r['seconds']} s", flush=True)
    print("\nmethod    mean accuracy  per seed")
    summary = {}
    for method in ("coconut", "codi"):
        accs = [r["accuracy"] for r in results if r["method"] == method]
        summary[method] = sum(accs) / len(accs)
        print(f"{method:8s}  {summary[method]:13.3f}  {', '.join(f'{a:.3f}' for a in accs)}")
    target = REPO / "benchmarks" / "results" / "codi_vs_coconut_cpu.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"epochs": args.epochs, "runs": results, "mean_accuracy": summary,
                                  "load": os.getloadavg()}, indent=2) + "\n")
    print(f"-> {target}")


if __name__ == "__main__":
    main()
