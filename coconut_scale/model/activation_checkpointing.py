"""Activation checkpointing that stays exact across Coconut's latent passes.

HF's own checkpointing (transformers 5.x) drops `past_key_values` inside every checkpointed decoder layer
and forces `use_cache=False`; with a cache carried from one latent pass to the next that gives errors or,
worse, silently wrong loss and gradients. Reentrant checkpointing loses the gradient that flows through the
cache. What is exact: HF's flag off, and non-reentrant `torch.utils.checkpoint` around each decoder layer's
forward, combined with `PassCache`, which never mutates itself (so a recompute sees the same past).
A layer called in one of Coconut's one-column passes is not checkpointed (below ZeRO-3): it runs once
(column_pass.py).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from coconut_scale.model.column_pass import in_one_column_pass, saving_cache_views
from coconut_scale.model.deferred_grad import recompute_context


def _contexts():
    # The recompute runs in the forward's deferral of weight gradients (deferred_grad.py), if any, so it saves
    # the tensors the forward saved.
    return contextlib.nullcontext(), recompute_context()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of any HF causal LM (also inside a peft wrapper).

    Found through `_no_split_modules`, the class names HF itself uses to keep a block on one device.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules match)")
    return layers


def enable_latent_safe_checkpointing(model: torch.nn.Module) -> int:
    """Wrap each decoder layer's forward in non-reentrant checkpointing; returns the number wrapped.

    Idempotent. Checkpointing only applies while gradients are recorded, so generation is unaffected.
    """
    # HF's own variant drops the carried cache (see module doc); transformers 5 renamed the switch.
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    if disable is not None:
        disable()
    count = 0
    for layer in decoder_layers(model):
        if getattr(layer, "_coconut_checkpointed", False):
            continue
        original = layer.forward

        @functools.wraps(original)
        def forward(*args, __original=original, **kwargs):
            if not torch.is_grad_enabled():
                return __original(*args, **kwargs)
            if in_one_column_pass():  # run once: its activations are tiny, attention's K/V kept as the cache's
                with saving_cache_views():
                    return __original(*args, **kwargs)
            return checkpoint(__original, *args, use_reentrant=False, context_fn=_contexts, **kwargs)

        layer.forward = forward
        layer._coconut_checkpointed = True
        count += 1
    return count


def disable_latent_safe_checkpointing(model: torch.nn.Module) -> None:
    for layer in decoder_layers(model):
        if getattr(layer, "_coconut_checkpointed", False):
            del layer.forward  # drops the instance attribute; the class method shows through again
            layer._coconut_checkpointed = False
