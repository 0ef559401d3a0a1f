"""A KV cache that is safe to carry across Coconut's latent passes under gradient checkpointing.

Why not HF's DynamicCache: it appends in place. With checkpointing, each decoder layer is re-run during
backward, and that re-run appends the same keys a second time (wrong attention, silently wrong gradients).

`PassCache` is immutable from the model's point of view: `update()` returns past + new without storing
anything but a record of `new` (the first call's: the forward's, never a recompute's). After a pass, the caller
builds the next pass's cache with `extended()`, from those records. Re-running a layer during backward therefore sees exactly the cache it saw in forward.

The past is kept as a list of chunks (one per pass) rather than concatenated after each pass: the
concatenation happens inside the layer, where checkpointing frees it, so the persistent memory is a single
copy of the keys/values however many latent passes there are.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from coconut_scale.model.column_pass import register_concatenation


class _PassLayer(DynamicLayer):
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.key_chunks = keys
        self.value_chunks = values
        self.past_len = sum(k.shape[-2] for k in keys)
        self.new_keys: torch.Tensor | None = None
        self.new_values: torch.Tensor | None = None
        if keys:
            self.is_initialized = True
            self.dtype, self.device = keys[0].dtype, keys[0].device

    def update(self, key_states, value_states, *args, **kwargs):
        # Recorded, not stored. Only the first call records: that is the forward pass, whose keys the next pass's
        # cache is built from. A checkpointing recompute during backward calls again with equal tensors; recording
        # those would keep the recompute's saved tensors (through their autograd graph) alive in every layer until
        # the whole pass's backward ends, instead of only while that layer's backward runs.
        if self.new_keys is None:
            self.new_keys, self.new_values = key_states, value_states
        if not self.key_chunks:
            return key_states, value_states
        key_chunks, value_chunks = [*self.key_chunks, key_states], [*self.value_chunks, value_states]
        keys, values = torch.cat(key_chunks, dim=-2), torch.cat(value_chunks, dim=-2)
        # In a one-column pass, what attention saves of these is kept as the chunks (column_pass.py).
        register_concatenation(keys, key_chunks, -2)
        register_concatenation(values, value_chunks, -2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.past_len

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.past_len + query_length, 0

    @property
    def keys(self):  # read by a few HF code paths (e.g. cross-attention reuse); never written here
        return torch.cat(self.key_chunks, dim=-2) if self.key_chunks else None

    @keys.setter
    def keys(self, value):
        pass

    @property
    def values(self):
        return torch.cat(self.value_chunks, dim=-2) if self.value_chunks else None

    @values.setter
    def values(self, value):
        pass


class PassCache(Cache):
    """Past keys/values of earlier passes; `update` never mutates them."""

    def __init__(self, num_layers: int, chunks: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None):
        chunks = chunks or [([], []) for _ in range(num_layers)]
        super().__init__(layers=[_PassLayer(k, v) for k, v in chunks])

    def extended(self, merge: bool | None = None) -> "PassCache":
        """The cache for the next pass: the past plus what each layer recorded in this one.

        `merge` concatenates all chunks into one per layer (the decode loop does this under no_grad, so
        each step pays one concatenation rather than one per earlier step); by default chunks are kept
        when gradients are being recorded. A merge consumes this cache: each layer lets go of its chunks once
        they are concatenated, so the merge holds the whole cache once plus one layer's copy, not two whole
        caches (the old one is never read again: every caller replaces it by the new one).
        """
        if merge is None:
            merge = not torch.is_grad_enabled()
        chunks = []
        for i, layer in enumerate(self.layers):
            if layer.new_keys is None:
                raise RuntimeError(f"layer {i} recorded no keys in this pass; was the cache passed to the model?")
            keys = [*layer.key_chunks, layer.new_keys]
            values = [*layer.value_chunks, layer.new_values]
            if merge and len(keys) > 1:
                layer.key_chunks = layer.value_chunks = layer.new_keys = layer.new_values = None  # consumed
                keys, values = [torch.cat(keys, dim=-2)], [torch.cat(values, dim=-2)]
            chunks.append((keys, values))
        return PassCache(len(self.layers), chunks)
