"""The non-finite guard: a step whose loss or gradient norm is not finite never reaches a checkpoint or an export.

It stops the run with a message naming the step, the micro-batch and the value, or skips up to
`optim.skip_nonfinite_steps` such steps (DeepSpeed's ZeRO already refuses a step whose global gradient norm is
not finite: the guard counts and logs those), as Megatron and torchtitan users expect.
"""

from __future__ import annotations

import math

import torch

from coconut_scale import distributed as dist
from coconut_scale.errors import UserError


class NonFiniteError(UserError):
    """A non-finite loss or gradient norm: the run stops before anything non-finite reaches the disk."""


class NonFiniteGuard:
    def __init__(self, recipe, strategy, log):
        self.recipe, self.strategy, self.log = recipe, strategy, log

    def check(self, losses: list[torch.Tensor], state, epoch: int, steps_per_epoch: int,
              stop_flag: torch.Tensor | None = None) -> tuple[bool, bool]:
        """(applied, stop): applied is False for a step skipped within optim.skip_nonfinite_steps (NonFiniteError for
        one that stops the run); stop is whether `stop_flag` (the ranks' agreement to stop on a signal,
        train/preemption.py), read back with the rest, is set.

        One host sync per optimizer step: this rank's micro-batch losses, the gradient norm the engine computed and
        the stop flag.
        The decision rests on facts every rank shares (the global norm; whether the engine applied the step), so
        all ranks stop or skip together. A loss non-finite on one rank only, with finite gradients, updates nothing
        non-finite; the logged loss (summed over ranks) catches it. fp16 runs skip steps by loss scaling, which is
        normal: there only the losses count.
        """
        applied, norm = self.strategy.step_outcome()
        like = dict(dtype=losses[0].dtype, device=losses[0].device)
        flag = [] if stop_flag is None else [stop_flag.reshape(()).to(**like)]
        values = torch.stack([*losses, torch.as_tensor(0.0 if norm is None else norm, **like), *flag]).tolist()
        stop = bool(flag) and values.pop() > 0
        micro, norm_value = values[:-1], (None if norm is None else values[-1])
        bad_micro = next((i for i, v in enumerate(micro) if not math.isfinite(v)), None)
        fp16 = self.recipe.model.dtype == "fp16"
        global_bad = not fp16 and (not applied or (norm_value is not None and not math.isfinite(norm_value)))
        if not global_bad and (bad_micro is None or dist.world_size() > 1):
            return True, stop
        where = (f"global step {state.global_step} (epoch {epoch}, step {state.step_in_epoch} of "
                 f"{steps_per_epoch})")
        what = (f"loss {micro[bad_micro]} in micro-batch {bad_micro + 1} of {len(micro)}"
                + (f" on rank {dist.rank()}" if dist.world_size() > 1 else "") if bad_micro is not None
                else f"every micro-batch loss finite on rank {dist.rank()}")
        what = f"non-finite step at {where}: {what}, gradient norm {norm_value}"
        budget = self.recipe.optim.skip_nonfinite_steps
        if not applied and not fp16 and state.skipped_steps < budget:
            state.skipped_steps += 1
            self.log.log("nonfinite_skip", global_step=state.global_step, epoch=epoch, micro_batch=bad_micro,
                         loss=micro[bad_micro] if bad_micro is not None else None, grad_norm=norm_value)
            self.log.print(f"{what}: skipped (gradients dropped, no update), {state.skipped_steps} of "
                           f"optim.skip_nonfinite_steps {budget}")
            return False, stop
        if applied and not self.strategy.skips_nonfinite_steps:
            why = "the engine applied it (ZeRO stage 0 does not refuse non-finite steps): the weights may not be finite"
        elif budget:
            why = f"optim.skip_nonfinite_steps {budget} already used up"
        else:
            why = "lower optim.lr, check the data, or allow skips with optim.skip_nonfinite_steps"
        raise NonFiniteError(f"{what}; the run stops before anything of this step is checkpointed or exported ({why})")
