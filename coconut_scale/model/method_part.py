"""Where a training method plugs into the Coconut wrapper: a `MethodPart`, a child module of the wrapper.

The Coconut latent loop (model/coconut.py) is the core: it runs the passes, feeds hidden states into the latent
positions and computes the language-model loss. A method that trains something more (SIM-CoT's step decoder,
model/step_supervision.py) is a `MethodPart`:

  - it is a child module of the wrapper (`Coconut.add_part`), so the wrapper stays the one module DeepSpeed wraps:
    ZeRO-3 partitions the part's parameters with the base model's, checkpoints carry them, and every pass's module
    hooks keep their order;
  - it reads its own batch tensors, handed to the wrapper as `part_inputs={part.name: {...}}` (its collator, in the
    data wing, builds them; the trainer passes them only at the stages the method trains);
  - `loss_terms(core, input_ids, inputs, out)` returns named loss terms from the batch's token ids, its own inputs,
    the core's output (`CoconutOutput`: the filled input embeddings, the number of passes) and its own modules;
    the wrapper returns them in `CoconutOutput.terms`;
  - optionally, `projects_feedback = True` with `project_feedback(hidden)`: every hidden state the core feeds back
    into a latent position goes through it first (CODI's projection, model/codi.py), in training and generation;
  - optionally, `state_columns(inputs)` -> a [B] LongTensor of columns: the core then returns every hidden-state
    entry of its last pass at those columns (`CoconutOutput.column_states`), for the part's loss;
  - the trainer combines them (train/losses.py: the core's loss plus each term times its recipe weight) and logs
    each term apart.

Building a part from a recipe is the model spec's job (model/spec.py), exporting it the exporter's
(train/export.py). docs/architecture.md lists what a new method writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from coconut_scale.model.coconut import Coconut, CoconutOutput


class MethodPart(nn.Module):
    """A training method's module beside the Coconut core (see the module doc)."""

    name: ClassVar[str]  # the wrapper's child name (state-dict prefix) and the key of its part_inputs
    terms: ClassVar[tuple[str, ...]]  # the loss terms it returns, logged as "<term>_loss"
    projects_feedback: ClassVar[bool] = False  # True: the core feeds back project_feedback(hidden)

    def project_feedback(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_columns(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Columns (one per row, in the last pass) whose hidden states at every layer the part reads; None: none."""
        return None

    def loss_terms(self, core: "Coconut", input_ids: torch.Tensor, inputs: dict[str, torch.Tensor],
                   out: "CoconutOutput") -> dict[str, torch.Tensor]:
        raise NotImplementedError
