"""What the training loop keeps between steps: where it is (`TrainState`, saved in every checkpoint), what one
optimizer step did (`StepResult`), and what it accumulated since the last logged line (`LogWindow`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

import torch

from coconut_scale.errors import UserError


@dataclass
class TrainState:
    """Where the loop is; saved as loop_state.json in every checkpoint (world-size free)."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    best_accuracy: float = -1.0
    stage: int | None = None  # stage of the last epoch trained (the optimizer reset looks at it)
    skipped_steps: int = 0  # non-finite steps skipped so far (optim.skip_nonfinite_steps)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(self)}
        missing = known - set(state)
        if missing:
            raise UserError(f"loop state lacks {sorted(missing)}: not a checkpoint of this coconut_scale version")
        for name in known:
            setattr(self, name, state[name])


@dataclass
class StepResult:
    """One optimizer step: each micro-batch's detached loss and logged parts ([Coconut loss, *terms], or none), and
    whether the step counts (False: a non-finite step skipped within optim.skip_nonfinite_steps)."""

    losses: list[torch.Tensor]
    parts: list[torch.Tensor] = field(default_factory=list)
    applied: bool = True
    stop: bool = False  # every rank agreed to stop here on a signal (checkpoint.on_signal)


class LogWindow:
    """What the loop accumulated since the last logged line, kept on the device: read back once per logged step."""

    def __init__(self, device: torch.device, n_parts: int = 2):
        self.device, self.width = device, n_parts
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.n_losses = torch.zeros((), device=self.device), 0
        self.part_sums, self.n_parts = torch.zeros(self.width, device=self.device), 0  # coconut loss, then terms
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, result: StepResult) -> None:
        for loss in result.losses:
            self.loss_sum += loss
        for parts in result.parts:
            self.part_sums += parts
        self.n_losses += len(result.losses)
        self.n_parts += len(result.parts)
