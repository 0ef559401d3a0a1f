"""One weight-gradient matmul per linear for all of Coconut's one-column latent passes.

A one-column pass multiplies [B, h] activations by every weight of the decoder. Its backward then writes a
full-size weight gradient per linear for those B rows ([out, in] from a rank-B product) and adds it into the
accumulated gradient: per pass, the whole model's gradient written and read again, for B rows of work. That is
memory-bound and, with a handful of latents, a visible share of the step (docs/benchmarks.md, "Latent passes at
the fair floor").

Here those passes' linears run through `_DeferredMatmul`, which gives autograd the input gradient only and keeps
(input, output gradient) for its weight. The weight's gradient is computed once, over all deferred passes' rows
([passes x B, in] and [passes x B, out]), in the backward of `_Anchor`, an identity on the first pass's hidden
states whose inputs are the weights themselves, so the gradient reaches them through autograd (their
AccumulateGrad, their hooks) once. `_Anchor`'s backward runs after every deferred pass's: each later pass starts
from the fill of the pass before it, a chain that ends in the first pass's hidden states.

Which calls: `F.linear(x, W, b)` (nn.Linear, peft's LoRA factors) and `torch.addmm(b, x, W)` (GPT-2's Conv1D) whose
weight is one of the anchored ones, seen through a TorchFunctionMode while a deferred pass runs, and again while
activation checkpointing recomputes a layer of one (`recompute_context`), so the recompute saves what the forward
saved. Weights ZeRO-3 partitions are never deferred (`weights_unpartitioned`): they are gathered only while their
module runs.
Exactness: the same products, summed in another order (float rounding only).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_ACTIVE = threading.local()  # the DeferredGrads whose pass is running now (None outside one)


@dataclass
class DeferredGrads:
    """The weights whose gradient is deferred, and what each deferred call left for it in backward."""

    weights: list[torch.Tensor]
    index: dict[int, int] = field(default_factory=dict)  # id(weight) -> position in `weights`
    rows: dict[int, list[tuple[torch.Tensor, torch.Tensor, bool]]] = field(default_factory=dict)

    def __post_init__(self):
        self.index = {id(w): i for i, w in enumerate(self.weights)}

    def gradient(self, i: int) -> torch.Tensor | None:
        """The summed gradient of weight i over every deferred call, as one matmul; None if nothing came."""
        entries = self.rows.pop(i, None)
        if not entries:
            return None
        inputs = torch.cat([x for x, _, _ in entries]) if len(entries) > 1 else entries[0][0]
        grads = torch.cat([g for _, g, _ in entries]) if len(entries) > 1 else entries[0][1]
        transposed = entries[0][2]
        grad = inputs.t() @ grads if transposed else grads.t() @ inputs
        return grad.to(self.weights[i].dtype)


class _DeferredMatmul(torch.autograd.Function):
    """x @ W.T (`transposed`: x @ W, addmm's layout) whose backward gives x its gradient and keeps W's for later."""

    @staticmethod
    def forward(ctx, x, weight, store, i, transposed):
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.i, ctx.transposed = store, i, transposed
        return x @ weight if transposed else x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        flat_x, flat_g = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        ctx.store.rows.setdefault(ctx.i, []).append((flat_x, flat_g, ctx.transposed))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.t() if ctx.transposed else grad_out @ weight
        return grad_x, None, None, None, None


class _Anchor(torch.autograd.Function):
    """Identity on the first pass's hidden states; its backward hands the deferred gradients to the weights."""

    @staticmethod
    def forward(ctx, hidden, store, *weights):
        ctx.store = store
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        store = ctx.store
        return (grad_hidden, None, *(store.gradient(i) for i in range(len(store.weights))))


class _Mode(TorchFunctionMode):
    def __init__(self, store: DeferredGrads):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Only calls whose input carries a gradient: the weight's gradient then flows through that input's graph
        # to the anchor. Any other call (keyword arguments, addmm's beta/alpha) runs as it is.
        if func is F.linear and len(args) >= 2 and set(kwargs) <= {"bias"}:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            i = self.store.index.get(id(weight))
            if i is not None and x.requires_grad:
                out = _DeferredMatmul.apply(x, weight.detach(), self.store, i, False)
                return out if bias is None else out + bias
        elif func is torch.addmm and not kwargs and len(args) == 3:
            bias, x, weight = args
            i = self.store.index.get(id(weight))
            if i is not None and x.requires_grad:
                return bias + _DeferredMatmul.apply(x, weight.detach(), self.store, i, True)
        return func(*args, **kwargs)


def weights_unpartitioned(module: torch.nn.Module) -> bool:
    """False where a parameter is ZeRO-3-partitioned (empty outside its module's forward, gathered by the module's
    hooks): neither the deferral nor a one-column pass that runs once (column_pass.py) applies there."""
    return not any(hasattr(p, "ds_id") for p in module.parameters())


def deferrable_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's trainable matrices (the weights of its linears, among others that no deferred call names)."""
    return [p for p in module.parameters() if p.requires_grad and p.dim() == 2]


def anchor(hidden: torch.Tensor, store: DeferredGrads) -> torch.Tensor:
    """The first pass's hidden states, through the node that gives the deferred weights their gradients."""
    return _Anchor.apply(hidden, store, *store.weights)


@contextlib.contextmanager
def deferring(store: DeferredGrads):
    """Run one deferred pass: the weights' matmuls in it keep their weight gradient for the anchor."""
    previous = getattr(_ACTIVE, "store", None)
    _ACTIVE.store = store
    try:
        with _Mode(store):
            yield
    finally:
        _ACTIVE.store = previous


def recompute_context():
    """For activation checkpointing: the context a layer's recompute must run in (the forward's deferral)."""
    store = getattr(_ACTIVE, "store", None)
    return deferring(store) if store is not None else contextlib.nullcontext()
