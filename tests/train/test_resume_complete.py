"""Re-running the command of a run that finished says so in one line and exits 0 at once: before the data, the model
or anything in output_dir, and before a process group waits on a model load."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from child_process import subprocess_env
from coconut_scale.config.recipe import load_recipe
from coconut_scale.train.checkpoints import LOOP_STATE, write_manifest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def _finished_run(out: Path, recipe) -> None:
    """output_dir with one verified checkpoint whose loop state has done the recipe's every epoch. Its DeepSpeed
    shards are not real: a run that tried to load them would fail."""
    ckpt = out / "checkpoints" / "step-00000024"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"not a shard")
    (ckpt / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.resolved_dict(), sort_keys=False))
    (ckpt / LOOP_STATE).write_text(json.dumps({"epoch": recipe.optim.epochs, "step_in_epoch": 0, "global_step": 24,
                                               "best_accuracy": 0.75, "stage": 2, "skipped_steps": 0,
                                               "world_size": 1}))
    write_manifest(ckpt)


def test_resuming_a_finished_run_says_already_complete_and_loads_nothing(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    overrides = [f"output_dir={out}", f"data.train_file={data}/train.json", f"data.val_file={data}/val.json",
                 "data.generate={kind: prosqa_synthetic, n_train: 16, n_val: 4, seed: 3}"]
    recipe = load_recipe(RECIPE, overrides)
    _finished_run(out, recipe)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "coconut_scale.train", str(RECIPE), *overrides], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("run already complete")]
    assert len(lines) == 1, proc.stdout[-3000:]
    assert str(out / "checkpoints" / "step-00000024") in lines[0] and "global step 24" in lines[0], lines[0]
    assert f"optim.epochs = {recipe.optim.epochs}" in lines[0], lines[0]
    assert "resumed from" not in proc.stdout and "Traceback" not in proc.stderr
    # Nothing written: no generated data, no log, no recipe copy (the lock file is the run lock's own).
    after = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert [p for p in after if p not in before and p.name != ".run.lock"] == [], after
    assert not data.exists()
