"""How many optimizer steps the learning-rate schedule spans: one formula for the trainer and for check.

The trainer builds the schedule with transformers' `get_scheduler(optim.scheduler, optimizer,
num_warmup_steps=optim.warmup_steps, num_training_steps=schedule_steps(...))`, so `optim.scheduler` takes the
HF names below. An epoch is `n // batch.global_batch_size` optimizer steps: the sampler drops the incomplete
last global batch (coconut_scale/data/sampler.py). With `coconut.reset_optimizer` the optimizer and its
schedule restart at every stage boundary (the paper's setting), so one schedule spans one stage,
`coconut.epochs_per_stage` epochs; otherwise it spans `optim.epochs` epochs.
"""

from __future__ import annotations

from coconut_scale.errors import UserError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")  # transformers.SchedulerType names


class ScheduleError(UserError):
    pass


def _epochs_per_schedule(recipe) -> tuple[int, str]:
    # cot and no_cot never change stage, so the optimizer is never reset: one schedule spans the whole run.
    if recipe.coconut.reset_optimizer and recipe.coconut.mode not in ("cot", "no_cot"):
        return recipe.coconut.epochs_per_stage, "coconut.epochs_per_stage (it restarts with each optimizer reset)"
    return recipe.optim.epochs, "optim.epochs"


def schedule_steps(recipe, n_train_examples: int) -> int:
    """Optimizer steps one LR schedule spans, for `n_train_examples` training records."""
    steps_per_epoch = n_train_examples // recipe.batch.global_batch_size
    if steps_per_epoch == 0:
        raise ScheduleError(f"{recipe.data.train_file}: {n_train_examples} training records give no full global "
                            f"batch of batch.global_batch_size {recipe.batch.global_batch_size}")
    return steps_per_epoch * _epochs_per_schedule(recipe)[0]


def describe_schedule(recipe, n_train_examples: int) -> str:
    """One line: the schedule that will train and where each of its numbers comes from."""
    o = recipe.optim
    steps = schedule_steps(recipe, n_train_examples)
    epochs, source = _epochs_per_schedule(recipe)
    g = recipe.batch.global_batch_size
    text = (f"LR schedule: {o.scheduler}, lr {o.lr:g}, warmup {o.warmup_steps} step(s), over {steps} optimizer "
            f"steps = {n_train_examples} records // global batch {g} = {n_train_examples // g} steps/epoch "
            f"x {epochs} epochs from {source}")
    if o.warmup_steps >= steps:
        text += f"; optim.warmup_steps {o.warmup_steps} >= {steps}: the LR never gets past the warmup"
    return text
