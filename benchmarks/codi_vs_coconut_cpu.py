"""CODI against Coconut on CPU, same data, model, batch and epochs, two seeds each: the all-latent accuracy.

`--setup tiny` (the default): both train the random 2-layer Llama of recipes/tiny_cpu*.yaml from scratch on the
same generated arithmetic problems (two iCoT steps each, numeric answers): Coconut through its curriculum (stages
0, 1, 2 with two epochs each, ending with both steps latent), CODI with two latents from the start. A tiny random
model is a check of the methods' mechanics at equal cost, not a statement about their accuracy at scale.

`--setup demo`: the README demo's model and data (recipes/demo_cpu.yaml: SmolLM2-135M-Instruct, LoRA r16, the
generated ProsQA-style problems of one or two steps, chance 50%, lr, batch 8, 3 epochs). Coconut runs the demo's
curriculum (stages 0, 1, 2, one epoch each); CODI runs 3 epochs with 2 latents (Coconut's final stage at
c_thought 1), with the `codi` keys its released rules need for text answers and sentence steps (docs/methods.md).
Both are scored once, at the end, with every step latent, by one rule: the last word of the generated text,
trailing punctuation removed, equals the gold answer's last word (the concept; evaluate/generation.py last_word).
Coconut's own accuracy (the answer text after '#', exactly) is reported beside it.

Either way both are scored with every step latent (Coconut stage 2, CODI's 2 thoughts); docs/methods.md has the
reading.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/codi_vs_coconut_cpu.py [--setup tiny|demo]
        [--seeds 0 1] [--methods coconut codi] [--epochs N]

A run whose result.json is already in its folder under --work is reused (delete the folder to rerun it), so the
runs can be made one at a time. Prints a table and writes benchmarks/results/codi_vs_coconut_cpu.json (tiny) or
codi_vs_coconut_demo_cpu.json (demo).
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
sys.path.insert(0, str(REPO))

from coconut_scale.evaluate.generation import last_word  # noqa: E402

RESULTS = {"tiny": "codi_vs_coconut_cpu.json", "demo": "codi_vs_coconut_demo_cpu.json"}
DEFAULT_EPOCHS = {"tiny": 6, "demo": 3}


def tiny_overrides(method: str, epochs: int, data: Path) -> tuple[Path, dict]:
    common = {"optim.epochs": epochs, "optim.lr": 3e-3, "optim.grad_clip": 1.0,
              "data.train_file": data / "train.json", "data.val_file": data / "val.json",
              "data.generate": "{kind: arithmetic_synthetic, n_train: 256, n_val: 64, seed: 0, min_steps: 2, "
                               "max_steps: 2}",
              "batch.global_batch_size": 16, "batch.micro_batch_size": 8, "batch.eval_batch_size": 16,
              "eval.max_new_tokens": 12, "eval.every_epochs": epochs, "logging.log_every_steps": 16,
              "checkpoint.export_hf": "false"}
    if method == "codi":
        return REPO / "recipes" / "tiny_cpu_codi.yaml", common
    common.update({"coconut.c_thought": 1, "coconut.max_latent_stage": 2,
                   "coconut.epochs_per_stage": max(1, epochs // 3)})
    return REPO / "recipes" / "tiny_cpu.yaml", common


def demo_overrides(method: str, epochs: int, data: Path, n_train: int, n_val: int) -> tuple[Path, dict]:
    # The demo recipe as it is (model, LoRA, data generator, lr, batch, schedule), evaluated once at the end with
    # every validation question's generation kept for the common scoring rule.
    common = {"optim.epochs": epochs, "data.train_file": data / "train.json", "data.val_file": data / "val.json",
              "data.generate.n_train": n_train, "data.generate.n_val": n_val, "eval.every_epochs": epochs,
              "logging.num_sample_outputs": n_val, "checkpoint.export_hf": "false"}
    if method == "codi":
        # 2 thoughts = Coconut's last stage (max_latent_stage 2 x c_thought 1). The GSM8k-Aug scripts' switches
        # (projection at the hidden size 576, distillation divided by the teacher's std, eos only after the
        # answer), and the keys that let CODI train on text answers and sentence steps.
        common.update({"method": "codi", "codi.num_latent": 2, "codi.use_prj": "true", "codi.prj_dim": 576,
                       "codi.distill_loss_div_std": "true", "codi.remove_eos": "true",
                       "codi.lone_space_rule": "token", "codi.answer_filter": "none",
                       "codi.answer_rule": "last_word", "codi.cot_rule": "steps"})
    return REPO / "recipes" / "demo_cpu.yaml", common


def run(setup: str, method: str, seed: int, epochs: int, out: Path, data: Path, sizes: tuple[int, int]) -> dict:
    cached = out / "result.json"
    if cached.exists():
        result = json.loads(cached.read_text())
        if result.get("setup", "tiny") == setup and result.get("epochs", epochs) == epochs:
            return {**result, "reused": True}
    if setup == "demo":
        recipe, overrides = demo_overrides(method, epochs, data, *sizes)
    else:
        recipe, overrides = tiny_overrides(method, epochs, data)
    overrides = {"output_dir": out, "seed": seed, **overrides}
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, "-m", "coconut_scale.train", str(recipe),
                           *[f"{k}={v}" for k, v in overrides.items()]], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    seconds = round(time.perf_counter() - start, 1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    result = {"setup": setup, "epochs": epochs, "method": method, "seed": seed, "accuracy": final["accuracy"],
              "val_loss": final["val_loss"], "stage": final["stage"], "mean_latents": final["mean_latents"],
              "n_examples": final["n_examples"], "seconds": seconds,
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}
    if setup == "demo":
        samples = [json.loads(line) for line in
                   (out / "samples" / f"epoch{final['epoch']:03d}.jsonl").read_text().splitlines()]
        if len(samples) != final["n_examples"]:
            raise SystemExit(f"{out}: {len(samples)} samples kept of {final['n_examples']} questions")
        # The common rule: the generated text's last word against the gold answer's (for Coconut the gold is the
        # sentence "Tom is a wumpus.", for CODI its last word "wumpus.").
        correct = [last_word(s["generated"]) == last_word(s["gold_answer"]) for s in samples]
        result.update({"accuracy_own_rule": result.pop("accuracy"), "accuracy": sum(correct) / len(correct)})
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=sorted(RESULTS), default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", choices=["coconut", "codi"], default=["coconut", "codi"])
    parser.add_argument("--epochs", type=int, default=None, help="default: 6 (tiny), 3 (demo)")
    parser.add_argument("--n-train", type=int, default=128, help="demo: training problems (the demo's 128)")
    parser.add_argument("--n-val", type=int, default=60, help="demo: validation problems (the demo's 60)")
    parser.add_argument("--work", default=None, help="default: runs/codi_vs_coconut_cpu[_demo]")
    parser.add_argument("--result", default=None, help="default: benchmarks/results/" + " or ".join(RESULTS.values()))
    args = parser.parse_args()
    epochs = args.epochs or DEFAULT_EPOCHS[args.setup]
    work = (REPO / (args.work or f"runs/codi_vs_coconut_cpu{'_demo' if args.setup == 'demo' else ''}")).resolve()
    data = work / "data"
    results = []
    for seed in args.seeds:
        for method in args.methods:
            results.append(run(args.setup, method, seed, epochs, work / f"{method}_seed{seed}", data,
                               (args.n_train, args.n_val)))
            r = results[-1]
            own = f", own rule {r['accuracy_own_rule']:.3f}" if "accuracy_own_rule" in r else ""
            print(f"{r['method']:8s} seed {r['seed']}: accuracy {r['accuracy']:.3f}{own} (stage {r['stage']}, "
                  f"{r['mean_latents']:.0f} latents, {r['n_examples']} questions), val_loss {r['val_loss']:.3f}, "
                  f"{r['seconds']} s{' (reused)' if r.get('reused') else ''}", flush=True)
    print("\nmethod    mean accuracy  per seed")
    summary = {}
    for method in args.methods:
        accs = [r["accuracy"] for r in results if r["method"] == method]
        summary[method] = sum(accs) / len(accs)
        print(f"{method:8s}  {summary[method]:13.3f}  {', '.join(f'{a:.3f}' for a in accs)}")
    target = Path(args.result) if args.result else REPO / "benchmarks" / "results" / RESULTS[args.setup]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"setup": args.setup, "epochs": epochs,
                                  "runs": [{k: v for k, v in r.items() if k != "reused"} for r in results],
                                  "mean_accuracy": summary, "load": os.getloadavg()}, indent=2) + "\n")
    print(f"-> {target}")


if __name__ == "__main__":
    main()
