"""kill -9 at random moments, resume, repeat: the run must end with the weights and losses of an uninterrupted one.

    python benchmarks/kill_resume.py --kills 20 [--seed 0] [--out benchmarks/results/kill_resume.json]

Trains recipes/tiny_cpu.yaml (one process, ZeRO-3, a checkpoint every step, three epochs through two stage
boundaries) once without interruption, then again under fire: a campaign re-runs the same command, SIGKILLing it
after a random delay (checkpoint writes and exports included), until an attempt completes; campaigns repeat until
--kills kills have landed. Each campaign's HF exports and logged losses are compared bit for bit with the
uninterrupted run's. Prints a table and writes JSON. Seconds per kill on 2 cores; not a CI test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def env() -> dict:
    out = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


def command(out: Path, data: Path) -> list[str]:
    overrides = {"output_dir": out, "data.train_file": data / "train.json", "data.val_file": data / "val.json",
                 "data.generate": "{kind: prosqa_synthetic, n_train: 32, n_val: 6, seed: 3}", "optim.epochs": 3,
                 "coconut.max_latent_stage": 2, "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
                 "checkpoint.save_every_steps": 1, "checkpoint.keep_last": 2, "eval.max_new_tokens": 4,
                 "logging.log_every_steps": 1}
    return [sys.executable, "-m", "coconut_scale.train", str(RECIPE), *(f"{k}={v}" for k, v in overrides.items())]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in rows if r["kind"] == "train"}  # a re-run step overwrites its line


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return {f"{stage}/{k}": v for stage in sorted(p.name for p in (out / "hf").iterdir() if not p.name.startswith("."))
            for k, v in load_file(str(out / "hf" / stage / "model.safetensors")).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/coconut_kill_resume")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kill_resume.json"))
    args = p.parse_args(argv)
    work, rng = Path(args.work), random.Random(args.seed)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    data = work / "data"
    t0 = time.perf_counter()
    subprocess.run(command(work / "clean", data), env=env(), cwd=REPO, check=True, capture_output=True)
    clean_s = time.perf_counter() - t0
    clean = final_weights(work / "clean"), losses(work / "clean")
    kills, campaigns = [], []
    while len(kills) < args.kills:  # a campaign: one run killed again and again until it completes
        out = work / f"killed{len(campaigns)}"
        landed = 0
        while True:
            delay = rng.uniform(1.5, max(2.5, clean_s / 2))  # start-up takes seconds: earlier kills break nothing
            proc = subprocess.Popen(command(out, data), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                _, err = proc.communicate(timeout=delay)
                break  # it finished before the kill
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                done = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if out.exists() else []
                kills.append({"campaign": len(campaigns), "after_s": round(delay, 2),
                              "newest_checkpoint": done[-1] if done else None})
                landed += 1
        weights, steps = final_weights(out), losses(out)
        campaigns.append({"kills": landed, "exit_code": proc.returncode, "stderr_tail": err[-1500:] if proc.returncode else "",
                          "weights_bit_identical": weights.keys() == clean[0].keys()
                          and all(torch.equal(weights[k], clean[0][k]) for k in weights),
                          "losses_identical": steps == clean[1]})
    ok = all(c["exit_code"] == 0 and c["weights_bit_identical"] and c["losses_identical"] for c in campaigns)
    report = {"kills": len(kills), "campaigns": campaigns, "clean_run_s": round(clean_s, 1),
              "n_tensors": len(clean[0]), "n_steps": len(clean[1]), "all_bit_identical": ok, "kill_log": kills,
              "load_average": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| campaign | kills | exit | exports bit-identical | losses identical |")
    print("| --- | --- | --- | --- | --- |")
    for i, c in enumerate(campaigns):
        print(f"| {i} | {c['kills']} | {c['exit_code']} | {c['weights_bit_identical']} | {c['losses_identical']} |")
        if c["exit_code"]:
            print(c["stderr_tail"])
    print(f"{len(kills)} kills in {len(campaigns)} campaigns; {len(clean[0])} exported tensors and {len(clean[1])} "
          f"logged losses compared; load average {os.getloadavg()[0]:.1f}")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
