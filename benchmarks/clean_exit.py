"""Clean exit: N consecutive two-process CPU training runs of recipes/tiny_cpu.yaml, and how many exit 0.

Issue 11 saw about 1 in 8 two-process runs end with `terminate called without an active exception` (SIGABRT on
rank 1) after printing `done`, so that torchrun reported a failure for a run that had finished. Each run here is

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 -m coconut_scale.train \\
        recipes/tiny_cpu.yaml output_dir=<own dir> <small data, one epoch>

(torchrun run as `python -m torch.distributed.run`, its own entry point, so the ranks use this interpreter)
in its own output directory (its own generated data, token cache, checkpoints and export), one after another.
The table shows each run's exit code, its time, whether `done:` was printed, and for a failure the reason
(signal / abort message) with the tail of its stderr; the JSON (benchmarks/results/clean_exit.json by default)
keeps the same plus versions and the command.

    python benchmarks/clean_exit.py                 # 20 runs, ~20-40 s each on 2 quiet cores
    python benchmarks/clean_exit.py --runs 3 --out benchmarks/results/clean_exit_smoke.json

Target (issue 11, item 8): 20 of 20 exit 0.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny_cpu.yaml"
ABORT_MARKERS = ("terminate called", "SIGABRT", "Signal 6", "core dumped", "Segmentation fault", "SIGSEGV")
DONE_MARKER = "done: best accuracy"
TAIL_CHARS = 3000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="consecutive runs (default 20)")
    p.add_argument("--epochs", type=int, default=1, help="optim.epochs of each run (default 1: stage 0 only)")
    p.add_argument("--n-train", type=int, default=16, help="generated training records per run")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a run is killed and counted failed")
    p.add_argument("--workdir", help="where the run directories go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (default: keep only failures)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "clean_exit.json"))
    return p.parse_args(argv)


def run_command(run_dir: Path, args) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "coconut_scale.train", RECIPE,
        f"output_dir={run_dir / 'out'}",
        f"data.train_file={run_dir / 'data' / 'train.json'}",
        f"data.val_file={run_dir / 'data' / 'val.json'}",
        f"data.generate={{kind: prosqa_synthetic, n_train: {args.n_train}, n_val: 4, seed: 0}}",
        f"optim.epochs={args.epochs}",
        "batch.global_batch_size=4", "batch.micro_batch_size=2", "batch.eval_batch_size=4",
        "eval.max_new_tokens=6",
    ]


def run_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "COCONUT_DEBUG"):
        env.pop(key, None)  # a launcher's own variables must not leak in from this shell
    return env


def failure_reason(rc: int | None, stderr: str) -> str | None:
    if rc == 0:
        return None
    if rc is None:
        return "timed out (killed)"
    found = [m for m in ABORT_MARKERS if m in stderr]
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}" + (f" ({', '.join(found)})" if found else "")
    return f"exit {rc}" + (f" ({', '.join(found)})" if found else "")


def stop(proc: subprocess.Popen) -> None:
    """End a run that ran past its time: torchrun and its ranks. torchrun starts each rank in a session of its
    own, so killing torchrun's process group would leave the ranks behind; they are found as its descendants."""
    import psutil

    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    proc.send_signal(signal.SIGTERM)  # torchrun's own shutdown: it stops the ranks and exits
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for rank in ranks:
        try:
            rank.kill()
        except psutil.NoSuchProcess:
            pass


def one_run(index: int, run_dir: Path, args) -> dict:
    run_dir.mkdir(parents=True)
    cmd = run_command(run_dir, args)
    stdout_log, stderr_log = run_dir / "stdout.log", run_dir / "stderr.log"
    start = time.monotonic()
    # Output to files, not pipes: a rank left running cannot then keep this script waiting on a pipe.
    with open(stdout_log, "w") as out, open(stderr_log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=out, stderr=err, text=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
    wall = time.monotonic() - start
    stdout, stderr = stdout_log.read_text(errors="replace"), stderr_log.read_text(errors="replace")
    reason = failure_reason(rc, stderr)
    return {
        "run": index,
        "rc": rc,
        "wall_s": round(wall, 2),
        "printed_done": DONE_MARKER in stdout + stderr,
        "reason": reason,
        "stderr_tail": stderr[-TAIL_CHARS:] if reason else None,
        "dir": str(run_dir),
    }


def versions() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "host": platform.node(), "cpus": os.cpu_count()}


def table(rows: list[dict]) -> str:
    lines = ["| run | exit | seconds | printed done | failure |", "| ---: | ---: | ---: | :---: | --- |"]
    for r in rows:
        rc = "timeout" if r["rc"] is None else str(r["rc"])
        lines.append(f"| {r['run']} | {rc} | {r['wall_s']:.1f} | {'yes' if r['printed_done'] else 'no'} | "
                     f"{r['reason'] or ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.runs < 1:
        raise SystemExit(f"--runs must be at least 1, got {args.runs}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="clean_exit-"))
    rows = []
    for i in range(args.runs):
        row = one_run(i, workdir / f"run-{i:02d}", args)
        rows.append(row)
        print(f"run {i + 1}/{args.runs}: {row['reason'] or 'exit 0'} in {row['wall_s']:.1f} s", flush=True)
        if not row["reason"] and not args.keep:
            shutil.rmtree(row["dir"])
    clean = sum(r["rc"] == 0 for r in rows)
    if not args.workdir and not any(workdir.iterdir()):
        workdir.rmdir()  # nothing failed, nothing kept

    print()
    print(table(rows))
    print(f"\n{clean} of {len(rows)} runs exited 0")
    for r in rows:
        if r["reason"]:
            print(f"\n--- run {r['run']} ({r['reason']}; logs in {r['dir']}): stderr tail ---\n{r['stderr_tail']}")

    result = {
        "benchmark": "clean_exit",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(run_command(Path("<run dir>"), args)),
        "env": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"},
        "runs_requested": args.runs,
        "exited_0": clean,
        "versions": versions(),
        "runs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if clean == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
