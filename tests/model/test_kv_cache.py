"""PassCache, directly: update never stores, extended() carries exactly what each layer recorded."""

import pytest
import torch

from coconut_scale.model.kv_cache import PassCache


def _kv(seed: int, length: int, batch: int = 2, heads: int = 2, dim: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g)


def test_update_returns_past_plus_new_and_stores_nothing():
    cache = PassCache(num_layers=2)
    k0, v0 = _kv(0, 3)
    keys, values = cache.update(k0, v0, 0)
    assert keys is k0 and values is v0  # empty past: the new keys as they are
    assert cache.get_seq_length(0) == 0  # nothing stored
    cache.update(*_kv(1, 3), 1)
    nxt = cache.extended()
    k1, v1 = _kv(2, 1)
    keys, values = nxt.update(k1, v1, 0)
    assert torch.equal(keys, torch.cat([k0, k1], dim=-2)) and torch.equal(values, torch.cat([v0, v1], dim=-2))
    assert nxt.get_seq_length(0) == 3
    # A recompute during backward calls update again with the same tensors: the result is the same, not longer.
    again, _ = nxt.update(k1, v1, 0)
    assert torch.equal(again, keys)


def test_extended_keeps_chunks_with_grad_and_merges_without():
    cache = PassCache(num_layers=1)
    for seed, length in ((0, 3), (1, 1), (2, 1)):
        cache.update(*_kv(seed, length), 0)
        with torch.enable_grad():
            cache = cache.extended()
    assert len(cache.layers[0].key_chunks) == 3 and cache.get_seq_length(0) == 5
    chunks = list(cache.layers[0].key_chunks)
    cache.update(*_kv(3, 1), 0)
    with torch.no_grad():
        merged = cache.extended()
    assert len(merged.layers[0].key_chunks) == 1 and merged.get_seq_length(0) == 6
    assert torch.equal(merged.layers[0].keys, torch.cat([*chunks, _kv(3, 1)[0]], dim=-2))
    # The merge consumed the old cache: it holds no chunk (so the merge never keeps two copies of the cache).
    assert cache.layers[0].key_chunks is None and cache.layers[0].new_keys is None


def test_extended_names_a_layer_that_recorded_nothing():
    cache = PassCache(num_layers=2)
    cache.update(*_kv(0, 2), 0)
    with pytest.raises(RuntimeError, match="layer 1 recorded no keys"):
        cache.extended()


def test_mask_sizes_count_the_past():
    cache = PassCache(num_layers=1)
    cache.update(*_kv(0, 4), 0)
    nxt = cache.extended()
    assert nxt.layers[0].get_mask_sizes(1) == (5, 0)
