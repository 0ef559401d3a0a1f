"""A recipe's engine: its model spec built inside the strategy's DeepSpeed context, then prepared.

    strategy = build_engine(recipe, ds_config, tokenizer, schedule_steps)
    strategy.engine     # the DeepSpeedEngine
    strategy.model      # the Coconut wrapper it trains (model/spec.py builds it)

The trainer, the tests and the GPU kit build their engines here, so each trains exactly the model a run trains.
"""

from __future__ import annotations

from coconut_scale.config.model_spec import model_spec
from coconut_scale.model.spec import build_training_model
from coconut_scale.train.strategy import DeepSpeedStrategy


def build_engine(recipe, ds_config: dict, tokenizer, schedule_steps: int, log=print) -> DeepSpeedStrategy:
    """The strategy of `recipe` with its engine prepared (`ds_config`: build_ds_config's, for this world size)."""
    strategy = DeepSpeedStrategy(ds_config)
    model = build_training_model(model_spec(recipe), tokenizer, gather=strategy.gather)
    strategy.prepare(model, recipe.optim, schedule_steps)
    params = list(model.parameters())
    n_total = sum(strategy.numel(p) for p in params)
    n_train = sum(strategy.numel(p) for p in strategy.trainable_parameters(model))
    log(f"model: {n_total / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable; ZeRO stage {strategy.zero_stage}; "
        f"checkpointing {'on' if recipe.model.gradient_checkpointing else 'off'}; "
        f"attention {model.base_causallm.config._attn_implementation}")
    return strategy
