"""Fingerprints of tiny CPU runs, to show that a refactor changed no number: losses, gradient norms, learning
rates, evaluation metrics and samples, every exported tensor, every checkpointed tensor and the loop state.

    python benchmarks/fingerprint_runs.py --out /tmp/before.json            # at the old commit
    python benchmarks/fingerprint_runs.py --out /tmp/after.json             # at the new one
    python benchmarks/fingerprint_runs.py --compare /tmp/before.json /tmp/after.json

`--repo DIR` runs another checkout's package (its own recipes and code) from here, so both sides can be taken in
one session. Each run is a real `coconut_scale.train` (plus one `coconut-scale eval` of an export) on generated
ProsQA-style data, in a fresh output directory: full fine-tuning under ZeRO-3 in one process and on two ranks,
LoRA under ZeRO-3 and ZeRO-2 (the fused loss), step supervision on two ranks, the pause-as-thought mode.
Tensors are compared by the sha256 of their bytes (with dtype and shape): bit for bit, not within a tolerance.
Timing fields (tokens/s, memory, wall time) are left out. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOLATILE = {"tokens_per_s", "peak_mem_gb", "time", "elapsed_s", "wall_s", "seconds", "examples_per_s"}

COMMON = {
    "optim.epochs": 3, "optim.grad_clip": 0.0, "coconut.max_latent_stage": 2, "coconut.uniform_prob": 0.3,
    "batch.global_batch_size": 4, "batch.micro_batch_size": 2, "batch.eval_batch_size": 4,
    "eval.max_new_tokens": 6, "logging.log_every_steps": 1, "checkpoint.save_every_steps": 5,
}
# name: (recipe, launcher, extra overrides)
RUNS = {
    "full_zero3_1proc": ("tiny_cpu.yaml", "python", {}),
    "full_zero3_2ranks": ("tiny_cpu.yaml", "torchrun", {}),
    "lora_zero3_1proc": ("tiny_cpu_lora.yaml", "python", {"lora.dropout": 0.0}),
    "lora_zero2_fused_loss": ("tiny_cpu_lora.yaml", "python",
                              {"deepspeed.config": "ds_configs/zero2_fp32.json", "deepspeed.overrides": "{}"}),
    "step_supervision_2ranks": ("tiny_cpu.yaml", "torchrun", {"coconut.step_supervision.enabled": "true",
                                                              "coconut.step_supervision.export_decoder": "true"}),
    "pause_as_thought": ("tiny_cpu.yaml", "python", {"coconut.mode": "pause_as_thought", "optim.epochs": 2}),
}


def _env(repo: Path) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(repo))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _tensor_digest(t) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    return f"{t.dtype}{list(t.shape)}:{hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:24]}"


def _tensors_in(obj, prefix: str, out: dict) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = _tensor_digest(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _tensors_in(obj[k], f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors_in(v, f"{prefix}/{i}", out)


def _records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def fingerprint_output(out: Path) -> dict:
    """Everything numeric a run left in `out`: metrics, samples, exports, the newest checkpoint."""
    import torch
    from safetensors.torch import load_file

    fp: dict = {"metrics": _records(out / "metrics.jsonl")}
    fp["samples"] = {p.name: _records(p) for p in sorted((out / "samples").glob("*.jsonl"))}
    exports = {}
    for st in sorted((out / "hf").rglob("*.safetensors")):
        if st.is_symlink():
            continue
        exports[str(st.relative_to(out / "hf"))] = {k: _tensor_digest(v) for k, v in sorted(load_file(str(st)).items())}
    fp["exports"] = exports
    fp["export_configs"] = {str(p.relative_to(out / "hf")): {k: v for k, v in json.loads(p.read_text()).items()
                                                             if k not in VOLATILE}
                            for p in sorted((out / "hf").rglob("*.json")) if p.parent.name != "adapter"}
    steps = sorted((out / "checkpoints").glob("step-*"))
    fp["checkpoints"] = [p.name for p in steps]
    if steps:
        newest = steps[-1]
        loop = json.loads((newest / "loop_state.json").read_text())
        fp["loop_state"] = loop
        shards = {}
        for shard in sorted((newest / "ds").glob("*.pt")):
            # Our own runs' DeepSpeed shards (pickles); read only to hash their tensors.
            _tensors_in(torch.load(shard, map_location="cpu", weights_only=False), shard.name, shards)
        fp["checkpoint_tensors"] = shards
        # torch's generators only: Python's and numpy's are seeded from the OS (nothing of the math draws from them).
        fp["rng"] = {p.name: hashlib.sha256(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                                        if k in ("torch", "cuda")}).encode()).hexdigest()[:24]
                     for p in sorted(newest.glob("rng_rank*.json"))}
    return fp


def _train_command(repo: Path, recipe: str, launcher: str, overrides: list[str]) -> list[str]:
    args = ["-m", "coconut_scale.train", str(repo / "recipes" / recipe), *overrides]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return [sys.executable, *args]


def run_all(repo: Path, names: list[str], work: Path) -> dict:
    data = work / "data"
    result = {}
    for name in names:
        recipe, launcher, extra = RUNS[name]
        out = work / name
        overrides = {**COMMON, "output_dir": str(out), "data.train_file": str(data / "train.json"),
                     "data.val_file": str(data / "val.json"),
                     "data.generate": "{kind: prosqa_synthetic, n_train: 48, n_val: 9, seed: 3}", **extra}
        cmd = _train_command(repo, recipe, launcher, [f"{k}={v}" for k, v in overrides.items()])
        print(f"== {name}", flush=True)
        proc = subprocess.run(cmd, cwd=work, env=_env(repo), capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        result[name] = fingerprint_output(out)
    if "full_zero3_1proc" in names:  # the eval command on the final export
        export = work / "full_zero3_1proc" / "hf" / "stage2"
        cmd = [sys.executable, "-m", "coconut_scale.eval", str(export), str(data / "val.json"),
               "--max-new-tokens", "6", "--out", str(work / "eval")]
        proc = subprocess.run(cmd, cwd=work, env=_env(repo), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"eval failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        result["eval"] = fingerprint_eval(work / "eval")
    return result


def fingerprint_eval(directory: Path) -> dict:
    report = json.loads((directory / "report.json").read_text())
    return {"report": {k: v for k, v in report.items() if k not in VOLATILE | {"checkpoint", "data"}},
            "samples": _records(directory / "samples.jsonl")}


def rescan(work: Path) -> dict:
    """The fingerprint of runs already in `work` (a --work directory), without running them again."""
    result = {name: fingerprint_output(work / name) for name in RUNS if (work / name / "metrics.jsonl").is_file()}
    if (work / "eval" / "report.json").is_file():
        result["eval"] = fingerprint_eval(work / "eval")
    return result


def _diff(a, b, path: str, out: list[str], limit: int = 40) -> None:
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{path}/{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out, limit)
    elif a != b:
        out.append(f"{path}: {json.dumps(a)[:120]} != {json.dumps(b)[:120]}")


def _renamed(node, renames: dict[str, str]):
    """`node` with every key path segment starting with an old name given its new name (state-dict prefixes)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            for old, new in renames.items():
                if isinstance(k, str) and old in k:
                    k = k.replace(old, new)
            out[k] = _renamed(v, renames)
        return out
    if isinstance(node, list):
        return [_renamed(v, renames) for v in node]
    return node


def compare(before: dict, after: dict, renames: dict[str, str] | None = None) -> list[str]:
    problems: list[str] = []
    _diff(_renamed(before, renames or {}), after, "", problems)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the fingerprint JSON here")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose package and recipes run")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW",
                        help="with --compare: a state-dict key prefix renamed between BEFORE and AFTER")
    parser.add_argument("--rescan", type=Path, metavar="WORK", help="fingerprint the runs already in WORK (with --out)")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        problems = compare(before, after, dict(r.split("=", 1) for r in args.rename))
        counted = sum(len(v.get("exports", {})) + len(v.get("checkpoint_tensors", {})) for v in after.values()
                      if isinstance(v, dict))
        print(f"{len(after)} runs, {counted} export files and checkpoint tensors compared")
        print("identical" if not problems else "DIFFERENT:\n  " + "\n  ".join(problems))
        return 0 if not problems else 1
    if args.out is None:
        parser.error("--out or --compare is required")
    if args.rescan:
        args.out.write_text(json.dumps(rescan(args.rescan), indent=1, sort_keys=True))
        print(f"wrote {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run_all(args.repo.resolve(), args.runs, work)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
