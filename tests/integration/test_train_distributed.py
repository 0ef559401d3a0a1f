"""End-to-end training on CPU (gloo): 1 process vs 2 ranks under ZeRO-3 (and ZeRO-2), launchers, kill -9 + resume.

The runs are training_runs.py's: the tiny recipe through a stage boundary with an optimizer reset, stage mixing
so that ranks hold different latent counts in the same step, uneven evaluation shards, every run under a timeout.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from child_process import default_sigint, subprocess_env
from coconut_scale.atomic_files import current_umask
from training_runs import REPO, TIMEOUT, command, kill_at_checkpoint, overrides, run

pytestmark = pytest.mark.slow


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "hf" / "stage2" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol=2e-5):
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    single = root / "single"
    run("python", single, data)
    return root, data, single


def test_single_process_run_trains_evaluates_and_exports(runs, train_losses):
    _, _, single = runs
    losses = train_losses(single)
    assert len(losses) == 3 * 12  # 48 records / global batch 4, three epochs
    evals = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["stage"] for e in evals] == [0, 1, 2]
    assert all(e["n_examples"] == 9 for e in evals)
    assert {"val_loss", "accuracy", "cot_exact_match", "mean_new_tokens"} <= evals[-1].keys()
    for stage in (0, 1, 2):
        cfg = json.loads((single / "hf" / f"stage{stage}" / "coconut_config.json").read_text())
        assert cfg["stage"] == stage and cfg["c_thought"] == 1
    assert (single / "samples" / "epoch002.jsonl").exists()
    # Every epoch ends a stage here: best names the best stage's export (first of equals), no second copy.
    best = max(evals, key=lambda e: e["accuracy"])["stage"]
    assert (single / "hf" / "best").is_symlink() and os.readlink(single / "hf" / "best") == f"stage{best}"
    assert (single / "hf" / "best" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    ckpt = sorted((single / "checkpoints").iterdir())[-1]
    assert {"loop_state.json", "recipe.resolved.yaml", "batch_table.txt"} <= {p.name for p in ckpt.iterdir()}


@pytest.fixture(scope="module")
def torchrun2(runs):
    root, data, _ = runs
    two = root / "torchrun2"
    run("torchrun", two, data)
    return two


def test_two_ranks_zero3_torchrun_equals_single_process(runs, torchrun2, train_losses):
    """1 rank x accum 2 vs 2 ranks x accum 1 at global batch 4: same losses, same final weights."""
    _, _, single = runs
    two = torchrun2
    l1, l2 = train_losses(single), train_losses(two)
    assert l1.keys() == l2.keys()
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    _assert_same_weights(single, two)


ZERO2 = {"deepspeed.config": "ds_configs/zero2_fp32.json", "deepspeed.overrides": "{}"}


def test_two_ranks_zero2_equal_one_process_on_the_fused_loss(runs, tmp_path, train_losses):
    """ZeRO-2 leaves the lm_head whole, so the loss takes the fused sweep (model/chunked_loss.py; ZeRO-3's
    partitioned head takes the module calls, tested above): 2 ranks x accum 1 equal 1 rank x accum 2."""
    _, data, _ = runs
    one, two = tmp_path / "zero2_one", tmp_path / "zero2_two"
    run("python", one, data, **ZERO2)
    run("torchrun", two, data, **ZERO2)
    l1, l2 = train_losses(one), train_losses(two)
    assert l1.keys() == l2.keys() and len(l1) == 3 * 12
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    _assert_same_weights(one, two)


def test_universal_checkpoint_resumes_a_two_rank_run_on_one_process(runs, torchrun2, train_losses):
    """2 ranks -> 1: the ZeRO-3 checkpoint at the stage 1 -> 2 boundary, converted to DeepSpeed's universal
    format, resumes in one process and ends where the never-interrupted single-process run ends."""
    root, data, single = runs
    out = root / "two_then_one"
    shutil.copytree(torchrun2, out)
    final, boundary = sorted((out / "checkpoints").glob("step-*"))[::-1][:2]
    shutil.rmtree(final)  # as if the 2-rank job had stopped after epoch 1
    shutil.rmtree(out / "hf" / "stage2")
    assert json.loads((boundary / "loop_state.json").read_text())["world_size"] == 2

    refused = subprocess.run(command("python", overrides(out, data)), cwd=REPO, env=subprocess_env(), capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert refused.returncode != 0
    assert "written by 2 ranks and this run has 1" in refused.stderr
    assert f"python -m coconut_scale.universal {boundary}" in refused.stderr

    convert = subprocess.run([sys.executable, "-m", "coconut_scale.universal", str(out)], cwd=REPO, env=subprocess_env(),
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert convert.returncode == 0, convert.stdout[-2000:] + convert.stderr[-4000:]
    assert (boundary / "ds_universal").is_dir()

    resumed = run("python", out, data)
    assert "(universal copy)" in resumed.stdout
    _assert_same_weights(single, out)
    l1, lr = train_losses(single), train_losses(out)
    for step in range(25, 37):  # epoch 2, trained by the single resumed process
        assert abs(l1[step] - lr[step]) < 1e-4, (step, l1[step], lr[step])


def test_deepspeed_launcher_with_module_equals_single_process(runs):
    root, data, single = runs
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    two = root / "ds2"
    run("deepspeed", two, data)
    _assert_same_weights(single, two)


def test_kill_9_mid_epoch_then_rerun_resumes_to_the_same_weights(runs, train_losses):
    root, data, single = runs
    out = root / "killed"
    kill_at_checkpoint(out, data, 5, **{"checkpoint.save_every_steps": 5})  # mid-epoch 0 (12 steps per epoch)
    assert not (out / "hf" / "stage2").exists()
    resumed = run("python", out, data, **{"checkpoint.save_every_steps": 5})
    assert "resumed from" in resumed.stdout
    _assert_same_weights(single, out)
    l1, lk = train_losses(single), train_losses(out)
    for step in l1:
        assert abs(l1[step] - lk[step]) < 1e-4, (step, l1[step], lk[step])


def test_export_reloads_with_from_pretrained_and_matches_engine_logits(runs, tmp_path):
    """The exported stage model, reloaded by transformers, gives the logits the engine's module gives."""
    root, data, single = runs
    script = REPO / "tests" / "integration" / "export_roundtrip.py"
    proc = subprocess.run([sys.executable, str(script), str(single / "recipe.resolved.yaml"), str(tmp_path)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "MAX_ABS_DIFF" in proc.stdout
    diff = float(proc.stdout.split("MAX_ABS_DIFF")[1].split()[0])
    assert diff < 1e-5


def test_ctrl_c_stops_with_one_line_naming_the_last_checkpoint(runs):
    root, data, _ = runs
    out = root / "interrupted"
    cmd = command("python", overrides(out, data, **{"checkpoint.save_every_steps": 2}))
    # The interrupt lands once checkpoint 2 is on disk, 34 optimizer steps before the run's end; the child takes
    # SIGINT whatever the disposition the suite was started with (default_sigint).
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    target = out / "checkpoints" / "step-00000002"
    deadline = time.time() + TIMEOUT
    while not target.exists():
        assert proc.poll() is None, "run ended before the checkpoint to interrupt at"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    last = [line for line in err.splitlines() if line.startswith("interrupted at epoch")]
    assert len(last) == 1 and "last checkpoint: " + str(out / "checkpoints" / "step-0000000") in last[0], err[-3000:]
    assert "Traceback" not in err


def test_truncated_optimizer_shard_in_the_newest_checkpoint_falls_back_to_the_previous_one(runs):
    """The newest checkpoint fails its manifest (a truncated ZeRO optimizer shard): the resume says which file, uses
    the epoch-2 boundary checkpoint instead, and ends where the never-damaged run ends, bit for bit."""
    root, data, single = runs
    out = root / "truncated"
    shutil.copytree(single, out)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    shard = next((newest / "ds").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.rmtree(out / "hf" / "stage2")
    resumed = run("python", out, data)
    skipped = [line for line in resumed.stdout.splitlines() if line.startswith(f"checkpoint {newest} skipped")]
    assert len(skipped) == 1 and str(shard) in skipped[0] and "truncated" in skipped[0], resumed.stdout[-3000:]
    assert "resumed from " + str(out / "checkpoints" / "step-00000024") in resumed.stdout
    wa, wb = _final_weights(single), _final_weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
