"""One-column latent passes under checkpointing (model/column_pass.py): run once, attention's keys and values kept
as the cache's chunks, and the step as exact as the checkpointed one that recomputes them."""

import pytest
import torch

from coconut_scale.model import column_pass
from coconut_scale.model.activation_checkpointing import (
    decoder_layers,
    disable_latent_safe_checkpointing,
    enable_latent_safe_checkpointing,
)
from coconut_scale.model.coconut import Coconut
from coconut_scale.model.reference import reference_forward
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import latent_batch, tiny_model

RTOL, ATOL = 1e-4, 1e-6  # tests/model/test_model.py's
ARCHS = ["gpt2", "llama", "qwen3"]
LATENTS, QUESTIONS = [0, 2, 6, 3], [7, 4, 9, 5]  # 6 aligned latents: passes 1-5 are one column wide


def _wrap(arch):
    model, tok = tiny_model(arch)
    tokens = LatentTokens.from_tokenizer(tok)
    return Coconut(model, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id), tokens


def _grads(coconut, batch):
    base = coconut.base_causallm
    base.zero_grad(set_to_none=True)
    loss = coconut(*batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}


def _checkpointed_grads(coconut, batch):
    """Loss and gradients with the latent-safe checkpointing on, and how often layer 0's MLP ran (forward and
    recompute)."""
    base = coconut.base_causallm
    calls = {"n": 0}
    handle = decoder_layers(base)[0].mlp.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    enable_latent_safe_checkpointing(base)
    try:
        loss, grads = _grads(coconut, batch)
    finally:
        disable_latent_safe_checkpointing(base)
        handle.remove()
    return loss, grads, calls["n"]


@pytest.mark.parametrize("defer", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_column_passes_run_once_and_keep_the_cache_as_chunks(arch, defer, monkeypatch):
    coconut, tokens = _wrap(arch)
    coconut.defer_weight_grads = defer
    base = coconut.base_causallm
    batch = latent_batch(tokens, LATENTS, QUESTIONS, seed=3)
    plan = coconut._plan(batch[0], None, None)
    one_column = sum(end - start == 1 for start, end in plan.ranges)
    assert one_column == 5
    plain_loss, plain = _grads(coconut, batch)

    seen = {"rebuilt": 0, "kept": []}
    pack, rebuild = column_pass.CacheViews.pack, column_pass._Concatenation.rebuild

    def counted_pack(self, t):
        packed = pack(self, t)
        if packed is t:
            seen["kept"].append(tuple(t.shape))
        return packed

    def counted_rebuild(self):
        seen["rebuilt"] += 1
        return rebuild(self)

    monkeypatch.setattr(column_pass.CacheViews, "pack", counted_pack)
    monkeypatch.setattr(column_pass._Concatenation, "rebuild", counted_rebuild)
    layers = decoder_layers(base)
    loss, ckpt, calls = _checkpointed_grads(coconut, batch)

    # Only the wide passes were recomputed; the one-column ones ran once.
    assert calls == len(plan.ranges) + (len(plan.ranges) - one_column)
    # Backward rebuilt attention's keys and values of every layer of every one-column pass from the chunks ...
    assert seen["rebuilt"] == 2 * len(layers) * one_column
    # ... and nothing saved as itself in those layers spans the sequence: [B, 1, *] activations, [B, kv, 1, d] new
    # keys, queries packed per KV head ([B, kv, heads / kv, d]), the [B, 1, 1, past] mask and weights (2-D); the
    # concatenations are [B, kv, past + 1, d], past + 1 at least the first one-column pass's end.
    assert seen["kept"]
    widest = max(s[-2] for s in seen["kept"] if len(s) == 4)
    shortest = plan.ranges[1][1]
    assert widest < shortest, f"a one-column layer saved a tensor {widest} columns wide: {sorted(set(seen['kept']))}"

    torch.testing.assert_close(loss, plain_loss, rtol=RTOL, atol=ATOL)
    assert ckpt.keys() == plain.keys()
    ref_loss, _ = reference_forward(base, *batch[:3], batch[3], tokens.latent_id)
    base.zero_grad(set_to_none=True)
    ref_loss.backward()
    for name, p in base.named_parameters():
        torch.testing.assert_close(ckpt[name], plain[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(ckpt[name], p.grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_a_view_of_a_concatenation_is_rebuilt_as_that_view():
    chunks = (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 1, 5))
    whole = torch.cat(chunks, dim=-2)
    views = column_pass.CacheViews()
    views.register(whole, chunks, -2)
    view = whole.transpose(-1, -2)[..., 1:]
    other = torch.randn(3)
    assert views.pack(other) is other
    for t in (whole, view):
        packed = views.pack(t)
        assert isinstance(packed, column_pass._Concatenation)
        rebuilt = views.unpack(packed)
        assert rebuilt.shape == t.shape and rebuilt.stride() == t.stride() and torch.equal(rebuilt, t)
        assert rebuilt.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_outside_a_layer_that_keeps_views_nothing_is_registered():
    chunks = (torch.randn(1, 1, 2, 2), torch.randn(1, 1, 1, 2))
    column_pass.register_concatenation(torch.cat(chunks, -2), chunks, -2)  # no layer running: a no-op
    with column_pass.saving_cache_views():
        whole = torch.cat(chunks, -2)
        column_pass.register_concatenation(whole, chunks, -2)
        assert isinstance(column_pass._STATE.views.pack(whole), column_pass._Concatenation)
    assert getattr(column_pass._STATE, "views", None) is None


def test_under_zero3_every_pass_is_recomputed():
    # ZeRO-3 gathers a module's weights for each call, so every rank must make the same calls; a pass one column wide
    # on one rank can be wider on another. With the weights tagged as ZeRO-3 tags them, one-column passes are
    # recomputed like the others.
    coconut, tokens = _wrap("llama")
    base = coconut.base_causallm
    batch = latent_batch(tokens, LATENTS, QUESTIONS, seed=3)
    plan = coconut._plan(batch[0], None, None)
    plain_loss, plain = _grads(coconut, batch)
    for p in base.parameters():
        p.ds_id = 0
    try:
        loss, ckpt, calls = _checkpointed_grads(coconut, batch)
    finally:
        for p in base.parameters():
            del p.ds_id
    assert calls == 2 * len(plan.ranges)
    torch.testing.assert_close(loss, plain_loss, rtol=RTOL, atol=ATOL)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
