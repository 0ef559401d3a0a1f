"""Bad recipes fail in coconut_scale.train before any process group or model exists, naming the problem."""

import pytest

from conftest import REPO
from coconut_scale.cli import train

RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe error was raised")

    monkeypatch.setattr("coconut_scale.train.strategy.load_causal_lm", forbidden)
    monkeypatch.setattr("coconut_scale.train.trainer.init_distributed", forbidden)


def _fails(overrides, match):
    with pytest.raises(ValueError, match=match):
        train.main([RECIPE, *overrides])


def test_typo_key_is_named():
    _fails(["optim.lrr=1e-3"], r"optim\.lrr")


def test_non_divisible_batch_names_every_number():
    _fails(["batch.global_batch_size=10", "batch.micro_batch_size=4"], r"10.*4")


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    _fails([f"data.train_file={missing}", "data.generate=null"], "nope.json")


def test_contradicting_ds_config_lists_the_mismatch():
    _fails(["deepspeed.overrides={train_micro_batch_size_per_gpu: 7, gradient_clipping: 0.5}"],
           r"(?s)train_micro_batch_size_per_gpu.*gradient_clipping|gradient_clipping.*train_micro_batch_size_per_gpu")
