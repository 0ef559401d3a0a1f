"""Deferred weight gradients of the one-column passes (model/deferred_grad.py) against each pass's own gradients
and the plain reference: equal, with checkpointing, with LoRA, with `.backward()` and hooks on the weights."""

import pytest
import torch

from coconut_scale.model import deferred_grad
from coconut_scale.model.activation_checkpointing import (
    disable_latent_safe_checkpointing,
    enable_latent_safe_checkpointing,
)
from coconut_scale.model.coconut import Coconut
from coconut_scale.model.reference import reference_forward
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import latent_batch, tiny_model

RTOL, ATOL = 1e-4, 1e-6  # tests/model/test_model.py's
ARCHS = ["gpt2", "llama", "qwen3"]


def _wrap(arch, seed=0):
    model, tok = tiny_model(arch, seed=seed)
    tokens = LatentTokens.from_tokenizer(tok)
    return Coconut(model, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id), tokens


def _step_grads(coconut, batch, defer: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    coconut.defer_weight_grads = defer
    coconut.base_causallm.zero_grad(set_to_none=True)
    loss = coconut(*batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in coconut.base_causallm.named_parameters() if p.grad is not None}


def _count_deferred(monkeypatch) -> dict:
    calls = {"matmul": 0, "anchor": 0}
    matmul_backward, anchor_backward = deferred_grad._DeferredMatmul.backward, deferred_grad._Anchor.backward

    def counted_matmul(ctx, g):
        calls["matmul"] += 1
        return matmul_backward(ctx, g)

    def counted_anchor(ctx, g):
        calls["anchor"] += 1
        return anchor_backward(ctx, g)

    monkeypatch.setattr(deferred_grad._DeferredMatmul, "backward", staticmethod(counted_matmul))
    monkeypatch.setattr(deferred_grad._Anchor, "backward", staticmethod(counted_anchor))
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_deferred_equals_per_pass_gradients_and_the_reference(arch, checkpointing, monkeypatch):
    coconut, tokens = _wrap(arch)
    base = coconut.base_causallm
    batch = latent_batch(tokens, [0, 2, 6, 3], [7, 4, 9, 5], seed=3)
    if checkpointing:
        enable_latent_safe_checkpointing(base)
    calls = _count_deferred(monkeypatch)
    loss, deferred = _step_grads(coconut, batch, defer=True)
    # The deferral really ran: one anchor, and every linear of every layer in the 5 one-column passes (6 aligned
    # latents: passes 1-5 are one column wide; the 6th latent opens the last pass).
    linears = sum(isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D" for m in base.get_decoder().modules())
    assert calls["anchor"] == 1 and calls["matmul"] == 5 * linears
    loss_each, each = _step_grads(coconut, batch, defer=False)
    disable_latent_safe_checkpointing(base)
    ref_loss, _ = reference_forward(base, *batch[:3], batch[3], tokens.latent_id)
    base.zero_grad(set_to_none=True)
    ref_loss.backward()
    ref = {n: p.grad for n, p in base.named_parameters() if p.grad is not None}

    torch.testing.assert_close(loss, loss_each, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=RTOL, atol=ATOL)
    assert deferred.keys() == each.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(deferred[name], each[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(deferred[name], ref[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_the_deferred_share_reaches_the_weights_through_autograd():
    """A hook on a weight (DDP, ZeRO-1/2, MemTracker) sees the whole gradient, the deferred passes' share included:
    the anchor hands it over through autograd, never by writing `.grad` behind the hooks' back."""
    coconut, tokens = _wrap("llama")
    base = coconut.base_causallm
    batch = latent_batch(tokens, [4, 4], [5, 3], seed=1)
    weight = base.model.layers[0].mlp.down_proj.weight
    seen = []
    handle = weight.register_hook(lambda g: seen.append(g.clone()))
    out = coconut(*batch)
    out.loss.backward()
    handle.remove()
    assert out.num_passes == 5  # first pass, 3 one-column latent passes, the pass opened by the 4th latent
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], weight.grad, rtol=0, atol=0)
    _, each = _step_grads(coconut, batch, defer=False)
    torch.testing.assert_close(seen[0], each["model.layers.0.mlp.down_proj.weight"], rtol=RTOL, atol=ATOL)


def test_lora_adapters_get_the_per_pass_gradients():
    from peft import LoraConfig, get_peft_model

    coconut, tokens = _wrap("llama")
    base = get_peft_model(coconut.base_causallm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                            init_lora_weights=False))
    coconut = Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)
    batch = latent_batch(tokens, [3, 5, 0], [4, 6, 5], seed=2)
    loss, deferred = _step_grads(coconut, batch, defer=True)
    loss_each, each = _step_grads(coconut, batch, defer=False)
    torch.testing.assert_close(loss, loss_each, rtol=RTOL, atol=ATOL)
    assert deferred.keys() == each.keys() and any("lora_A" in n for n in deferred)
    for name in each:
        torch.testing.assert_close(deferred[name], each[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_a_broken_deferral_is_caught(monkeypatch):
    """Negative control: dropping the deferred rows (the weights then miss the one-column passes' share) fails."""
    coconut, tokens = _wrap("gpt2")
    batch = latent_batch(tokens, [0, 2, 6, 3], [7, 4, 9, 5], seed=3)
    _, each = _step_grads(coconut, batch, defer=False)
    monkeypatch.setattr(deferred_grad.DeferredGrads, "gradient", lambda self, i: None)
    _, broken = _step_grads(coconut, batch, defer=True)
    assert any(not torch.allclose(broken[n], each[n], rtol=RTOL, atol=ATOL) for n in each if n in broken)


def test_generation_and_no_grad_do_not_defer(monkeypatch):
    coconut, tokens = _wrap("llama")
    batch = latent_batch(tokens, [3, 3], [4, 6], seed=2)
    monkeypatch.setattr(deferred_grad, "_Mode", None)  # entering a deferral would fail
    with torch.no_grad():
        coconut(*batch)
