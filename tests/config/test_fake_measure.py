"""`check --measure` on tiny recipes (seconds): the step executed on fake tensors is the real one (fake and real CPU
runs of the same model agree), its split adds up, the layer fit extrapolates, and the estimate holds to it.

The 8B/4B recipes are measured by benchmarks/bench_fake_measure.py, not here."""

import pytest
import torch

from coconut_scale.cli.check import main as check_main
from coconut_scale.config.fake_step import CATEGORIES, PeakTracker, RecipeRun
from coconut_scale.config.measured_memory import (fit_line, measure_recipe, micro_batches, shard, world_size_rows,
                                                  zero_stage)
from coconut_scale.config.recipe import load_recipe
from coconut_scale.config.ds_config import zero_settings

TINY = "recipes/tiny_cpu.yaml"
TINY_LORA = "recipes/tiny_cpu_lora.yaml"
# A deeper and wider tiny Llama for the layer fit (the fit needs more layers than it measures).
DEEPER = ["model.from_config={model_type: llama, hidden_size: 128, intermediate_size: 256, num_hidden_layers: 6, "
          "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512, tie_word_embeddings: false}"]
# Fake and real runs of one model could differ only where the code reads the data (transformers skips the attention
# mask of a batch without padding on real tensors; fake ones hold no values to check): the batches are padded.
TRAIN_TOLERANCE, GENERATION_TOLERANCE = 0.001, 0.001


@pytest.mark.parametrize("path, overrides", [(TINY, []), (TINY_LORA, ["lora.dropout=0.0"]), (TINY_LORA, []),
                                             (TINY_LORA, ["model.dtype=bf16"])])
def test_fake_and_real_cpu_runs_of_one_model_agree(path, overrides):
    recipe = load_recipe(path, overrides)
    runs = {}
    for fake in (True, False):
        torch.manual_seed(0)
        run = RecipeRun(recipe, fake=fake)
        runs[fake] = run.step(2), run.generation()
    (fake, fake_gen), (real, real_gen) = runs[True], runs[False]
    # Model states: exactly the same bytes (parameters, every gradient after backward, the optimizer's states).
    assert fake.after_step.params == real.after_step.params > 0
    assert fake.after_backward.gradients == real.after_backward.gradients > 0
    assert fake.after_step.optimizer == real.after_step.optimizer > 0
    assert fake.optimizer.optimizer == real.optimizer.optimizer  # the step's fp32 gradient copy included
    active = lambda phase: phase.activations + phase.temporaries  # noqa: E731
    assert active(fake.train) == pytest.approx(active(real.train), rel=TRAIN_TOLERANCE)
    assert active(fake_gen.peak) == pytest.approx(active(real_gen.peak), rel=GENERATION_TOLERANCE)


def test_the_split_adds_up_to_the_trackers_own_total():
    recipe = load_recipe(TINY_LORA)
    run = RecipeRun(recipe)
    seen = []
    make = run._tracker

    def keep():
        tracker = make()
        seen.append(tracker)
        return tracker

    run._tracker = keep
    step = run.step(2)
    tracker = seen[0]
    totals = [snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()]
    assert step.optimizer.total == sum(totals)  # the last phase's peak: every category counted, nothing else
    assert set(vars(step.train)) == set(CATEGORIES)
    m = measure_recipe(recipe, micro_batches(recipe, [1, 2]).values())
    for row in world_size_rows(recipe, m, [1, 2]):
        assert row.measured_total == pytest.approx(sum(row.measured.values()))
        assert row.measured_total > 0 and row.step_s > 0 and row.tokens_per_s > 0


def test_three_layer_counts_extrapolate_to_a_deeper_model():
    recipe = load_recipe(TINY_LORA, DEEPER)
    m = measure_recipe(recipe, [2])  # measured at 2, 3, 4 decoder layers, fitted to the recipe's 6
    assert m.layer_counts == [2, 3, 4] and m.layers == 6 and m.fit_residual < 0.01
    direct = RecipeRun(recipe, 6).step(2)
    for name in CATEGORIES:
        assert m.train[2][name] == pytest.approx(getattr(direct.train, name), rel=0.01, abs=2**16), name
    assert m.params == sum(p.numel() for p in {id(p): p for p in RecipeRun(recipe, 6).model.parameters()}.values())


def test_fit_line_is_least_squares():
    line = fit_line([2, 3, 4], [5.0, 7.0, 9.0])
    assert (line.intercept, line.slope, line.residual) == (1.0, 2.0, 0.0)
    assert fit_line([2, 3, 4], [5.0, 7.5, 9.0]).residual > 0


def test_zero3_sharding_of_the_measured_states():
    recipe = load_recipe(TINY, ["batch.world_sizes=[1, 2]"])
    assert zero_stage(recipe) == 3
    z = {**zero_settings({"zero_optimization": {"stage": 3}}), "max_live_parameters": 0}
    phase = {"params": 800.0, "buffers": 8.0, "gradients": 400.0, "gradient_sums": 40.0, "optimizer": 1200.0,
             "activations": 50.0, "temporaries": 5.0}
    out = shard(phase, z, 4, params=100.0, trainable=100.0, transient=400.0)
    # weights: the partition and the unpartitioned buffers; .grad sharded, the gradients still being summed not
    assert out == {"weights": 208.0, "gradients": 100.0 + 40.0, "optimizer": 200.0 + 100.0, "activations": 50.0,
                   "temporaries": 5.0}
    z["sub_group_size"] = 10  # ZeRO-3 copies the gradients to fp32 10 parameters at a time
    assert shard(phase, z, 4, params=100.0, trainable=100.0, transient=400.0)["optimizer"] == 200.0 + 40.0


@pytest.mark.parametrize("path", [TINY, TINY_LORA])
def test_check_measure_on_a_tiny_recipe_holds_the_estimate_to_the_measurement(path, capsys):
    assert check_main([path, "--measure", "--no-ds-config"]) == 0
    out = capsys.readouterr().out
    assert "measured on fake tensors" in out and "FAIL" not in out
    recipe = load_recipe(path)
    m = measure_recipe(recipe, micro_batches(recipe, recipe.batch.world_sizes).values())
    rows = world_size_rows(recipe, m, recipe.batch.world_sizes)
    assert rows and all(r.within_tolerance() for r in rows), [(r.activation_error, r.total_error) for r in rows]


def test_the_peak_tracker_leaves_frozen_parameters_unhooked():
    layer = torch.nn.Linear(4, 4)
    layer.weight.requires_grad_(False)
    tracker = PeakTracker()
    tracker.skip_frozen_parameters(layer)
    tracker.track_external(layer)
    with tracker:
        layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert tracker.peak("current")["gradients"] == 4 * 4  # the bias's gradient only
