"""A run has one recipe: a resume with a recipe that changes the math stops before weights load, listing every key
as old -> new; checkpoint.allow_changes accepts named keys, which then take effect (a new lr at once) and are
recorded; output-only keys change freely."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from child_process import subprocess_env
from coconut_scale.config.recipe import RecipeError, load_recipe
from coconut_scale.train.recipe_guard import RecipeChangeError, check_resume

REPO = Path(__file__).resolve().parents[2]

RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def _checkpoint(tmp_path, *overrides):
    """A directory holding the resolved recipe as a checkpoint stores it."""
    ckpt = tmp_path / "step-00000010"
    ckpt.mkdir()
    (ckpt / "recipe.resolved.yaml").write_text(yaml.safe_dump(load_recipe(RECIPE, overrides).resolved_dict()))
    return ckpt


def test_every_math_change_is_listed_old_to_new_in_one_error(tmp_path):
    ckpt = _checkpoint(tmp_path)
    new = load_recipe(RECIPE, ["optim.lr=5e-2", "batch.global_batch_size=4", "coconut.c_thought=2",
                               "coconut.mode=cot", "deepspeed.overrides.zero_optimization.stage3_param_persistence_"
                               "threshold=10"])
    with pytest.raises(RecipeChangeError) as err:
        check_resume(new, ckpt)
    message = str(err.value)
    for line in ("optim.lr: 0.001 -> 0.05", "batch.global_batch_size: 8 -> 4", "coconut.c_thought: 1 -> 2",
                 'coconut.mode: "coconut" -> "cot"',
                 "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold: 0 -> 10"):
        assert line in message, message
    assert "5 key(s)" in message and "checkpoint.allow_changes" in message and str(ckpt) in message


def test_output_only_keys_change_freely(tmp_path):
    ckpt = _checkpoint(tmp_path)
    new = load_recipe(RECIPE, ["logging.log_every_steps=7", "eval.every_epochs=2", "logging.num_sample_outputs=1",
                               "checkpoint.keep_last=5", "checkpoint.save_every_steps=3", "output_dir=/elsewhere",
                               "batch.eval_batch_size=1", "eval.max_new_tokens=3"])
    assert check_resume(new, ckpt) == {}


def test_allow_changes_accepts_named_keys_and_sections(tmp_path):
    ckpt = _checkpoint(tmp_path)
    new = load_recipe(RECIPE, ["optim.lr=5e-2", "coconut.c_thought=2", "checkpoint.allow_changes=[optim.lr, coconut]"])
    assert check_resume(new, ckpt) == {"optim.lr": [0.001, 0.05], "coconut.c_thought": [1, 2]}
    partly = load_recipe(RECIPE, ["optim.lr=5e-2", "coconut.c_thought=2", "checkpoint.allow_changes=[optim.lr]"])
    with pytest.raises(RecipeChangeError, match=r"1 key\(s\).*coconut\.c_thought: 1 -> 2") as err:
        check_resume(partly, ckpt)
    assert "optim.lr" not in str(err.value).split("math:")[1].split(".")[0]


def test_allow_changes_must_name_recipe_keys():
    with pytest.raises(RecipeError, match=r"checkpoint\.allow_changes.*optim\.lrr.*did you mean 'optim\.lr'"):
        load_recipe(RECIPE, ["checkpoint.allow_changes=[optim.lrr]"])


def test_keys_added_to_the_schema_since_count_at_their_defaults(tmp_path):
    ckpt = _checkpoint(tmp_path)
    saved = yaml.safe_load((ckpt / "recipe.resolved.yaml").read_text())
    del saved["optim"]["skip_nonfinite_steps"]  # as written by a version before the key existed
    (ckpt / "recipe.resolved.yaml").write_text(yaml.safe_dump(saved))
    assert check_resume(load_recipe(RECIPE), ckpt) == {}


# -- end to end: refused before the model loads; an allowed lr takes effect at once ---------------------------------

def _run(out, data, *extra):
    env = subprocess_env()
    cmd = [sys.executable, "-m", "coconut_scale.train", str(RECIPE), f"output_dir={out}",
           f"data.train_file={data / 'train.json'}", f"data.val_file={data / 'val.json'}",
           "data.generate={kind: prosqa_synthetic, n_train: 24, n_val: 4, seed: 3}", "batch.global_batch_size=4",
           "logging.log_every_steps=1", "checkpoint.save_every_steps=3", "eval.max_new_tokens=4", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_resume_refuses_a_new_lr_then_applies_an_allowed_one_at_once(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    first = _run(out, data)
    assert first.returncode == 0, first.stderr[-3000:]
    # As if killed right after the mid-epoch-1 checkpoint (6 steps per epoch: step-9 of 12).
    shutil.rmtree(out / "checkpoints" / "step-00000012")
    shutil.rmtree(out / "hf" / "stage1")
    exported = (out / "hf" / "stage0" / "model.safetensors").read_bytes()

    refused = _run(out, data, "optim.lr=5e-2")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
    assert "optim.lr: 0.001 -> 0.05" in errors[0] and "model:" not in refused.stdout
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["optim"]["lr"] == 0.001  # not overwritten

    allowed = _run(out, data, "optim.lr=5e-2", "checkpoint.allow_changes=[optim.lr]")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "recipe changed on resume (checkpoint.allow_changes): optim.lr: 0.001 -> 0.05" in allowed.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    change = [r for r in rows if r["kind"] == "recipe_change"]
    assert len(change) == 1 and change[0]["changes"] == {"optim.lr": [0.001, 0.05]} and change[0]["global_step"] == 9
    lrs = {r["global_step"]: r["lr"] for r in rows if r["kind"] == "train"}
    assert lrs[9] == 0.001 and lrs[10] == lrs[12] == 0.05  # the first step after the resume trains at the new lr
    history = json.loads((out / "checkpoints" / "step-00000012" / "recipe_changes.json").read_text())
    assert history[0]["changes"] == {"optim.lr": [0.001, 0.05]}
    assert (out / "hf" / "stage0" / "model.safetensors").read_bytes() == exported  # the old stage's export kept
