"""The one console command: `coconut-scale COMMAND` (= `python -m coconut_scale COMMAND`) dispatches to every tool,
refuses abbreviated flags, and ends a user error with one `error:` line and exit code 2."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from child_process import subprocess_env
from coconut_scale.cli.main import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]


def coconut_scale(*args, cwd=REPO, **env):
    """`python -m coconut_scale ARGS` in a fresh process (what the console script runs)."""
    full_env = {k: v for k, v in subprocess_env().items() if k != "COCONUT_DEBUG"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "coconut_scale", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=180)


def test_help_lists_every_command_with_one_line_each():
    proc = coconut_scale("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, command in COMMANDS.items():
        assert any(line.split() == [name, *command.summary.split()] for line in lines), name
    assert set(COMMANDS) == {"train", "check", "eval", "universal", "noise-sweep", "ablations", "probing", "curves",
                             "decode-latents"}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_dispatches_to_its_module(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    module = importlib.import_module(COMMANDS[name].module)
    assert out.startswith("usage: ") and module.__doc__.splitlines()[0] in out  # that module's own parser


def test_a_missing_or_unknown_command_is_a_usage_error(capsys):
    for argv in ([], ["trian"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, abbreviated", [
    (["eval", "ckpt", "data.json", "--batch", "4"], "--batch"),
    (["noise-sweep", "ckpt", "data.json", "--batch", "4"], "--batch"),
    (["ablations", "ckpt", "data.json", "--batch", "4"], "--batch"),
    (["probing", "ckpt", "data.json", "--max-ex", "4"], "--max-ex"),
    (["curves", "run", "--ou", "x"], "--ou"),
    (["check", "recipes/tiny_cpu.yaml", "--world", "8"], "--world"),
    (["universal", "run", "--work", "2"], "--work"),
])
def test_abbreviated_flags_are_refused(argv, abbreviated, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {abbreviated}" in capsys.readouterr().err


def _fake_export(directory):
    """Enough of an HF export for eval to get past the checkpoint and reach the data file."""
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "coconut_config.json").write_text(json.dumps(
        {"c_thought": 1, "stage": 1, "max_latent_stage": 1, "mode": "coconut",
         "start_id": 1, "latent_id": 2, "end_id": 3, "eos_id": 0, "pad_id": 0}))
    return directory


def _bad_data_recipe(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps([{"question": "q", "steps": ["s"], "answer": "a"}, {"question": "q", "answer": "a"}]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "tiny_cpu.yaml").read_text())
    return recipe, ["--set", f"data.train_file={bad}"]


@pytest.mark.parametrize("case", ["check: recipe path", "check: override", "check: data file", "eval: checkpoint",
                                  "eval: data file"])
def test_user_errors_are_one_line_naming_the_culprit_with_exit_code_2(case, tmp_path):
    if case == "check: recipe path":
        proc, named = coconut_scale("check", tmp_path / "nope.yaml"), str(tmp_path / "nope.yaml")
    elif case == "check: override":
        proc, named = coconut_scale("check", "recipes/tiny_cpu.yaml", "--set", "optim.lrr=1"), "'optim.lrr'"
    elif case == "check: data file":
        recipe, overrides = _bad_data_recipe(tmp_path)
        proc, named = coconut_scale("check", recipe, *overrides, cwd=tmp_path), "record 1"
    elif case == "eval: checkpoint":
        proc, named = coconut_scale("eval", tmp_path / "no_export", tmp_path / "d.json"), str(tmp_path / "no_export")
    else:
        export = _fake_export(tmp_path / "export")
        proc, named = coconut_scale("eval", export, tmp_path / "missing.json"), str(tmp_path / "missing.json")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr


def test_coconut_debug_shows_the_traceback(tmp_path):
    proc = coconut_scale("check", tmp_path / "nope.yaml", COCONUT_DEBUG="1")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "RecipeError" in proc.stderr


@pytest.mark.parametrize("shim", ["check", "eval", "universal"])
def test_module_shims_exit_through_the_same_handler(shim, tmp_path):
    """`python -m coconut_scale.X` (train: below) turns a user error into the one `error:` line and exit code 2."""
    missing = tmp_path / "nope"
    args = {"check": [f"{missing}.yaml"], "eval": [str(missing), f"{missing}.json"], "universal": [str(missing)]}[shim]
    env = {k: v for k, v in os.environ.items() if k != "COCONUT_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", f"coconut_scale.{shim}", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], \
        proc.stderr


@pytest.mark.parametrize("launch", ["coconut-scale train", "python -m coconut_scale.train"])
@pytest.mark.parametrize("case", ["override", "recipe path", "data file"])
def test_train_user_errors_are_one_line_with_exit_code_2(launch, case, tmp_path):
    """Bad input to training fails before any model loads, as one line that names it."""
    if case == "override":
        args, named = ["recipes/tiny_cpu.yaml", "optim.lrr=1"], "'optim.lrr'"
    elif case == "recipe path":
        args, named = [tmp_path / "nope.yaml"], str(tmp_path / "nope.yaml")
    else:
        missing = tmp_path / "nope.json"
        args, named = ["recipes/tiny_cpu.yaml", f"data.train_file={missing}", "data.generate=null"], str(missing)
    if launch == "coconut-scale train":
        proc = coconut_scale("train", *args)
    else:
        env = {k: v for k, v in os.environ.items() if k != "COCONUT_DEBUG"}
        proc = subprocess.run([sys.executable, "-m", "coconut_scale.train", *map(str, args)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr


@pytest.mark.parametrize("message, collective", [
    ("Application timeout caused pair closure", True),  # gloo: a gather waited past the timeout on a frozen peer
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500", True),
    ("Timed out waiting 20000ms for recv operation to complete", True),
    ("Socket Timeout", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("shape '[2, 8]' is invalid for input of size 15", False),
])
def test_a_collective_failure_is_told_from_other_errors_by_its_text(monkeypatch, message, collective):
    from coconut_scale import distributed
    from coconut_scale.cli import train

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert train.is_collective_failure(RuntimeError(message)) is collective
    monkeypatch.setattr(distributed, "world_size", lambda: 1)  # one process: no peer to blame
    assert not train.is_collective_failure(RuntimeError(message))
