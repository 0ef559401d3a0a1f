"""The loss the optimizer minimises: the Coconut loss plus each method part's terms, weighted by the recipe.

    loss = out.loss + sum(weights[name] * term for name, term in out.terms.items())

The model returns its terms apart (model/method_part.py) so that the weights live with the trainer, and each term
is logged on its own (`<name>_loss` in metrics.jsonl, beside `coconut_loss`).
"""

from __future__ import annotations

from typing import Mapping

import torch


def training_loss(out, weights: Mapping[str, float]) -> torch.Tensor:
    """The weighted sum of a CoconutOutput's loss and terms; a term without a weight is a configuration bug."""
    loss = out.loss
    for name, term in (out.terms or {}).items():
        if name not in weights:
            raise KeyError(f"the model returned a loss term {name!r} with no weight (weights: {sorted(weights)})")
        weighted = weights[name] * term
        loss = weighted if loss is None else loss + weighted
    return loss


def logged_parts(out) -> torch.Tensor | None:
    """[Coconut loss, *terms] detached, in the order of `out.terms`, for the log; None when no part ran."""
    if not out.terms or out.loss is None:
        return None
    return torch.stack([out.loss.detach(), *(t.detach() for t in out.terms.values())])
