"""Coconut's one-column latent passes under activation checkpointing: run once, never recomputed.

A checkpointed decoder layer keeps only its inputs and runs its forward again in backward. For the wide passes
that trades one forward for the activations of every column. A one-column pass has [B, 1, h]-sized activations:
what its layers save is one column's worth per row, so recomputing them buys little memory and costs a whole
extra pass over every weight (on a GPU, where a one-column pass is bound by reading the weights, a third more of
its time). What keeping them costs is in config/memory.py's model (the one-column passes' LAYER_SAVED).

One exception is not tiny: attention saves the keys and values it attended to, which in a one-column pass are
the cache's chunks concatenated with the new column, [B, kv heads, T, d] per layer and per pass (at 8B, micro
32 x 512, 32 layers and 7 passes about 14 GiB). The concatenation is rebuilt from the chunks instead: while a
one-column pass's layer runs, `_PassLayer.update` (kv_cache.py) registers each concatenation it returns with its
chunks, and a saved-tensor hook keeps the chunk list (tensors the cache holds anyway) in place of a registered
tensor or a view of one, and concatenates them again when backward asks for it. What stays saved per layer and
pass is then [B, 1, *]-sized.

Coconut marks its one-column passes with `one_column_pass()`; the latent-safe checkpointing
(activation_checkpointing.py) runs a layer called inside one without checkpointing, under `saving_cache_views()`.
Not under ZeRO-3: there every rank must run the same module calls (each gathers its weights), and a pass that is
one column wide on one rank can be wider, so recomputed, on another.
Without checkpointing nothing here runs: every layer keeps what autograd saves (attention's concatenations too).
Exactness: the same operations as the recompute, on equal tensors.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import NamedTuple

import torch

_STATE = threading.local()  # .one_column: inside a one-column pass; .views: the CacheViews of the running layer


class _Concatenation(NamedTuple):
    """What a saved concatenation (or a view of one) is rebuilt from."""

    chunks: tuple[torch.Tensor, ...]
    dim: int
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None  # size, stride, storage offset; None: the whole

    def rebuild(self) -> torch.Tensor:
        whole = torch.cat([c.detach() for c in self.chunks], dim=self.dim)
        return whole if self.view is None else whole.as_strided(*self.view)


class CacheViews:
    """Saved-tensor hooks that keep a registered concatenation as its chunks."""

    def __init__(self):
        self.registered: dict[int, tuple[weakref.ref, tuple[torch.Tensor, ...], int]] = {}

    def register(self, result: torch.Tensor, chunks, dim: int) -> None:
        self.registered[id(result)] = (weakref.ref(result), tuple(chunks), dim)

    def _entry(self, t: torch.Tensor):
        entry = self.registered.get(id(t))
        return entry if entry is not None and entry[0]() is t else None

    def pack(self, t: torch.Tensor):
        entry = self._entry(t)
        if entry is not None:
            return _Concatenation(entry[1], entry[2], None)
        base = t._base
        entry = self._entry(base) if base is not None else None
        if entry is not None:
            return _Concatenation(entry[1], entry[2], (tuple(t.size()), tuple(t.stride()), t.storage_offset()))
        return t

    @staticmethod
    def unpack(packed):
        return packed.rebuild() if isinstance(packed, _Concatenation) else packed


@contextlib.contextmanager
def one_column_pass():
    """Coconut, around the decoder call of a one-column pass: its checkpointed layers run once (see module doc)."""
    previous = getattr(_STATE, "one_column", False)
    _STATE.one_column = True
    try:
        yield
    finally:
        _STATE.one_column = previous


def in_one_column_pass() -> bool:
    return getattr(_STATE, "one_column", False)


@contextlib.contextmanager
def saving_cache_views():
    """Run one layer of a one-column pass: concatenations of the cache that autograd saves are kept as chunks."""
    previous = getattr(_STATE, "views", None)
    views = _STATE.views = CacheViews()
    try:
        with torch.autograd.graph.saved_tensors_hooks(views.pack, views.unpack):
            yield
    finally:
        _STATE.views = previous


def register_concatenation(result: torch.Tensor, chunks, dim: int) -> None:
    """kv_cache.py: `result` is torch.cat(chunks, dim); rebuilt from them if saved while a layer keeps cache views."""
    views = getattr(_STATE, "views", None)
    if views is not None:
        views.register(result, chunks, dim)
