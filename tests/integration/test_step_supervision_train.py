"""Step supervision through the whole trainer on CPU: ZeRO-3 with 1 process vs 2 ranks (torchrun), the two losses
logged apart, the decoder left out of the HF export by default and written beside it on request, then reattached.

Stage mixing (uniform_prob) gives ranks rows of different latent-step counts in the same step, and rows with no
latent at all (the decoder then still runs once, on a dummy pair).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from coconut_scale.model.loading import load_exported_with_step_decoder
from coconut_scale.model.step_supervision import StepSupervision
from training_runs import kill_at_checkpoint, run

pytestmark = pytest.mark.slow
STEP = {"coconut.step_supervision.enabled": "true", "coconut.step_supervision.export_decoder": "true"}


def _train_records(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_train")
    data = root / "data"
    run("python", root / "one", data, **STEP)
    run("torchrun", root / "two", data, **STEP)
    return root / "one", root / "two"


def test_losses_are_logged_apart_and_two_ranks_equal_one(runs, train_losses):
    one, two = runs
    rec1, rec2 = _train_records(one), _train_records(two)
    latent = [r for r in rec1 if r["stage"] >= 1]
    assert latent and all({"coconut_loss", "step_loss"} <= r.keys() for r in latent)
    assert all("step_loss" not in r for r in rec1 if r["stage"] == 0)  # stage 0 has no latent step
    for r in latent:
        assert abs(r["loss"] - (r["coconut_loss"] + r["step_loss"])) < 1e-3 * max(1.0, r["loss"])
    l1, l2 = train_losses(one), train_losses(two)
    assert l1.keys() == l2.keys()
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4 * max(1.0, l1[step]), (step, l1[step], l2[step])
    step1 = {r["global_step"]: r["step_loss"] for r in rec1 if "step_loss" in r}
    step2 = {r["global_step"]: r["step_loss"] for r in rec2 if "step_loss" in r}
    assert step1.keys() == step2.keys() and step1
    for step in step1:  # the step loss on its own, not only the sum, is the same on 2 ranks as on 1
        assert abs(step1[step] - step2[step]) < 1e-4 * max(1.0, step1[step]), (step, step1[step], step2[step])


def test_export_drops_the_decoder_writes_it_beside_and_the_loader_reattaches_it(runs):
    one, two = runs
    export = one / "hf" / "stage2"
    model_keys = load_file(str(export / "model.safetensors")).keys()
    assert not any(k.startswith("step_decoder") for k in model_keys)
    # 2-rank ZeRO-3 and 1 process train the same decoder
    d1 = load_file(str(one / "hf" / "stage2" / "step_decoder" / "model.safetensors"))
    d2 = load_file(str(two / "hf" / "stage2" / "step_decoder" / "model.safetensors"))
    assert d1.keys() == d2.keys()
    for key in d1:
        torch.testing.assert_close(d1[key], d2[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")
    model, _, meta, step = load_exported_with_step_decoder(export)
    assert step.c_thought == meta.c_thought == 1 and not step.shared
    loaded = model.part(StepSupervision.name).decoder.state_dict()
    for key, value in d1.items():
        torch.testing.assert_close(loaded[key], value)


def test_kill_9_and_resume_carries_the_decoder(runs, tmp_path, train_losses):
    """The decoder lives in the engine's module, so checkpoints carry it: a run killed mid-epoch and resumed ends
    with the decoder, the model and the losses of the uninterrupted run."""
    one, _ = runs
    out = tmp_path / "killed"
    extra = {**STEP, "checkpoint.save_every_steps": 5}
    kill_at_checkpoint(out, one.parent / "data", 15, **extra)  # epoch 1, stage 1: the decoder has trained 3 steps
    run("python", out, one.parent / "data", **extra)
    for part in ("model.safetensors", "step_decoder/model.safetensors"):
        a, b = load_file(str(one / "hf" / "stage2" / part)), load_file(str(out / "hf" / "stage2" / part))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m: f"{part} {key}: {m}")
    assert train_losses(out) == train_losses(one)


def test_with_lora_on_base_and_decoder_two_ranks_equal_one(tmp_path):
    """LoRA adapters on the base and on the separate decoder: 2-rank ZeRO-3 logs the same coconut and step losses
    as one process, and trains the same decoder adapters."""
    lora = {**STEP, "lora.enabled": "true", "lora.rank": 4, "lora.alpha": 8, "lora.dropout": 0.0, "optim.epochs": 2,
            "coconut.max_latent_stage": 1}
    data = tmp_path / "data"
    run("python", tmp_path / "one", data, **lora)
    run("torchrun", tmp_path / "two", data, **lora)
    rec1, rec2 = _train_records(tmp_path / "one"), _train_records(tmp_path / "two")
    parts1 = {r["global_step"]: (r["coconut_loss"], r["step_loss"]) for r in rec1 if "step_loss" in r}
    parts2 = {r["global_step"]: (r["coconut_loss"], r["step_loss"]) for r in rec2 if "step_loss" in r}
    assert parts1 and parts1.keys() == parts2.keys()
    for step, (c1, s1) in parts1.items():
        c2, s2 = parts2[step]
        assert abs(c1 - c2) < 1e-4 * max(1.0, c1) and abs(s1 - s2) < 1e-4 * max(1.0, s1), (step, parts1[step], parts2[step])
    d1 = load_file(str(tmp_path / "one" / "hf" / "stage1" / "step_decoder" / "model.safetensors"))
    d2 = load_file(str(tmp_path / "two" / "hf" / "stage1" / "step_decoder" / "model.safetensors"))
    assert d1.keys() == d2.keys()
    for key in d1:
        torch.testing.assert_close(d1[key], d2[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")
