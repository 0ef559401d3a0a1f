"""Bad recipes fail in coconut_scale.train before any process group or model exists, naming the problem."""

import re
from pathlib import Path

import pytest

from coconut_scale.cli import train

REPO = Path(__file__).resolve().parents[2]

RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe error was raised")

    monkeypatch.setattr("coconut_scale.model.loading.load_causal_lm", forbidden)
    monkeypatch.setattr("coconut_scale.train.trainer.init_distributed", forbidden)


def _fails(overrides, match):
    with pytest.raises(ValueError, match=match):
        train.main([RECIPE, *overrides])


def test_typo_key_is_named():
    _fails(["optim.lrr=1e-3"], r"optim\.lrr")


def test_non_divisible_batch_names_every_number():
    # global, micro, world size and their product, then the micro batches that would divide it
    _fails(["batch.global_batch_size=10", "batch.micro_batch_size=4"],
           re.escape("global_batch_size 10 is not divisible by micro_batch_size 4 x world_size 1 = 4; "
                     "pick micro_batch_size in {1, 2, 5, 10} for world_size 1"))


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    _fails([f"data.train_file={missing}", "data.generate=null"], "nope.json")


def test_contradicting_ds_config_lists_the_mismatch():
    _fails(["deepspeed.overrides={train_micro_batch_size_per_gpu: 7, gradient_clipping: 0.5}"],
           r"(?s)train_micro_batch_size_per_gpu.*gradient_clipping|gradient_clipping.*train_micro_batch_size_per_gpu")


@pytest.mark.parametrize("override, names", [
    ("{zero_optimization: {stage3_typo_key: 1}}", "zero_optimization.stage3_typo_key = 1: Extra inputs"),
    ("{zero_optimization: {offload_optimizer: {device: cpuu}}}", "zero_optimization.offload_optimizer.device = 'cpuu'"),
])
def test_deepspeed_rejects_what_its_own_config_model_rejects_before_any_model(override, names):
    """DeepSpeed's own config parser runs on the filled config, in train (here) and in check (below)."""
    _fails([f"deepspeed.overrides={override}"], rf"zero3_fp32\.json.*{re.escape(names)}")
    from coconut_scale.cli.check import check_recipe

    lines = []
    failures = check_recipe(RECIPE, [1], overrides=[f"deepspeed.overrides={override}"], out=lines.append)
    assert failures and any("zero3_fp32.json" in f and names in f for f in failures), lines
