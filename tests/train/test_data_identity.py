"""The data's identity in every checkpoint: each data file's size, digest and record count and the token cache keys.
A resume on an edited or extended data file is refused in one line naming the file and the old and new record
counts, before anything is written or loaded; checkpoint.allow_changes: [data.train_file] accepts it and records it
like any allowed recipe change."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from coconut_scale.config.recipe import load_recipe
from coconut_scale.data.prosqa_synthetic import generate
from coconut_scale.data.records import write_records
from coconut_scale.train.data_identity import DATA_FILE, DataChangeError, check_data, data_identity

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
import fault_runs as fr  # noqa: E402

RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def _recipe(tmp_path, *extra):
    return load_recipe(RECIPE, [f"data.train_file={tmp_path / 'train.json'}", f"data.val_file={tmp_path / 'val.json'}",
                                *extra])


def _checkpoint_of(tmp_path, recipe):
    ckpt = tmp_path / "step-00000004"
    ckpt.mkdir()
    (ckpt / DATA_FILE).write_text(json.dumps(data_identity(recipe)))
    return ckpt


@pytest.fixture
def files(tmp_path):
    records = generate(12, seed=1, n_concepts=6, min_depth=2, max_depth=3)
    write_records(records[:10], tmp_path / "train.json")
    write_records(records[10:], tmp_path / "val.json")
    return records


def test_an_unchanged_file_passes_and_every_field_is_recorded(tmp_path, files):
    recipe = _recipe(tmp_path)
    ckpt = _checkpoint_of(tmp_path, recipe)
    assert check_data(recipe, ckpt, data_identity(recipe)) == {}
    saved = json.loads((ckpt / DATA_FILE).read_text())["train_file"]
    assert saved["records"] == 10 and saved["size"] == (tmp_path / "train.json").stat().st_size
    assert len(saved["xxh3_128-256MiB"]) == 32


@pytest.mark.parametrize("edit, old_new", [
    (lambda recs: recs + recs[:3], (10, 13)),  # records appended
    (lambda recs: [{**recs[0], "answer": recs[0]["answer"] + "!"}] + recs[1:], (10, 10)),  # one record edited
])
def test_a_changed_file_is_refused_naming_it_and_both_counts(tmp_path, files, edit, old_new):
    recipe = _recipe(tmp_path)
    ckpt = _checkpoint_of(tmp_path, recipe)
    write_records(edit(files[:10]), tmp_path / "train.json")
    with pytest.raises(DataChangeError) as caught:
        check_data(recipe, ckpt, data_identity(recipe))
    message = str(caught.value)
    print(message)
    old, new = old_new
    assert message.startswith(f"data.train_file {tmp_path / 'train.json'} changed since checkpoint {ckpt}")
    assert f"it had {old} records" in message and f"it has {new} (" in message
    assert "checkpoint.allow_changes: [data.train_file]" in message


def test_allow_changes_accepts_it_as_a_recorded_change(tmp_path, files):
    ckpt = _checkpoint_of(tmp_path, _recipe(tmp_path))
    write_records(files[:10] + files[:2], tmp_path / "train.json")
    recipe = _recipe(tmp_path, "checkpoint.allow_changes=[data.train_file]")
    accepted = check_data(recipe, ckpt, data_identity(recipe))
    assert list(accepted) == ["data.train_file"]
    assert "10 records" in accepted["data.train_file"][0] and "12 records" in accepted["data.train_file"][1]


@pytest.mark.slow
def test_a_resume_on_extended_data_is_refused_before_anything_is_written_then_accepted(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    extra = {"checkpoint.save_every_steps": 3, "optim.epochs": 1}
    first = fr.run("python", out, data, **extra)
    assert first.returncode == 0, first.stderr[-3000:]
    # As if killed after the mid-epoch checkpoint (6 steps per epoch: step-3 of 6).
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    shutil.rmtree(out / "hf")
    train = data / "train.json"
    records = json.loads(train.read_text())
    train.write_text(json.dumps(records + records[:8]))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    refused = fr.run("python", out, data, **extra)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    print(errors)
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
    assert f"data.train_file {train} changed since checkpoint" in errors[0]
    assert f"it had {fr.N_TRAIN} records" in errors[0] and f"it has {fr.N_TRAIN + 8} (" in errors[0]
    assert "model:" not in refused.stdout  # refused before the model was built
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    lock = out / ".run.lock"
    assert after.keys() == before.keys() and lock.read_text() == ""  # nothing written; the lock released
    assert {p: t for p, t in after.items() if p != lock} == {p: t for p, t in before.items() if p != lock}

    allowed = fr.run("python", out, data, **extra, **{"checkpoint.allow_changes": "[data.train_file]"})
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "recipe changed on resume (checkpoint.allow_changes): data.train_file:" in allowed.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    change = [r for r in rows if r["kind"] == "recipe_change"]
    assert len(change) == 1 and list(change[0]["changes"]) == ["data.train_file"]
    assert change[0]["global_step"] == 3
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    history = json.loads((newest / "recipe_changes.json").read_text())
    assert f"{fr.N_TRAIN + 8} records" in history[0]["changes"]["data.train_file"][1]
