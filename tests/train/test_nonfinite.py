"""Non-finite guard: a NaN loss stops the run naming the step, micro-batch and value before anything of it is
checkpointed or exported; optim.skip_nonfinite_steps skips (and logs) up to N such steps first.

The NaN is made deterministically by the recipe: optim.lr 1e30 moves every weight by ~1e30 on the first step,
and the second forward overflows fp32 (RMSNorm squares them) to a NaN loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from child_process import subprocess_env

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(out, data, *extra):
    env = subprocess_env()
    cmd = [sys.executable, "-m", "coconut_scale.train", str(REPO / "recipes" / "tiny_cpu.yaml"), f"output_dir={out}",
           f"data.train_file={data / 'train.json'}", f"data.val_file={data / 'val.json'}",
           "data.generate={kind: prosqa_synthetic, n_train: 24, n_val: 4, seed: 3}", "batch.global_batch_size=4",
           "logging.log_every_steps=1", "checkpoint.save_every_steps=1", "optim.lr=1e30", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    return errors[0]


def test_nan_loss_stops_naming_step_micro_batch_and_value_with_nothing_saved(tmp_path):
    out = tmp_path / "run"
    error = _error(_run(out, tmp_path / "data"))
    assert "non-finite step at global step 2 (epoch 0, step 2 of 6): loss nan in micro-batch 1 of 2" in error
    # Step 1 (finite) was checkpointed; nothing of step 2 reached the disk, and no export was written.
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000001"]
    assert not (out / "hf").exists()


def test_skip_nonfinite_steps_skips_n_then_stops(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, tmp_path / "data", "optim.skip_nonfinite_steps=2")
    error = _error(proc)
    assert "global step 4" in error and "optim.skip_nonfinite_steps 2 already used up" in error
    skipped = [line for line in proc.stdout.splitlines() if ": skipped (gradients dropped, no update)" in line]
    assert [s.split(" (epoch")[0] for s in skipped] == ["non-finite step at global step 2",
                                                        "non-finite step at global step 3"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows if r["kind"] == "nonfinite_skip"] == [2, 3]
    assert [r["global_step"] for r in rows if r["kind"] == "train"] == [1]  # a skipped step logs no loss
    # The skipped steps' checkpoints hold the last finite weights (DeepSpeed dropped the NaN gradients).
    loop = json.loads((out / "checkpoints" / "step-00000003" / "loop_state.json").read_text())
    assert loop["skipped_steps"] == 2
