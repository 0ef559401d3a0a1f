"""Chunked cross-entropy (model/chunked_loss.py) inside Coconut.forward: the same loss and gradients as the
full-logits loss, without [B, T, V] logits, on both of its paths (the fused sweep for a plain unhooked head, the
checkpointed module calls for a hooked one, as under ZeRO-3 or LoRA's tied head); and the forward/generate
signature (pass-plan hint, no keyword sinks)."""

import math

import pytest
import torch

from coconut_scale.config.recipe import LoraCfg
from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
from coconut_scale.model.chunked_loss import chunked_shifted_cross_entropy
from coconut_scale.model.coconut import Coconut, latent_columns, shifted_cross_entropy
from coconut_scale.model.lora import apply_lora
from coconut_scale.model.reference import reference_forward
from coconut_scale.model.tokens import IGNORE_INDEX, LatentTokens
from coconut_scale.testing import latent_batch, tiny_model

ARCHS = ["gpt2", "llama", "qwen3"]
RTOL, ATOL = 1e-5, 1e-7
BATCH = ([0, 2, 6, 3], [7, 4, 9, 5])  # latents per row, question lengths


def _wrap(arch, loss_chunks=3, seed=0):
    model, tok = tiny_model(arch, seed=seed)
    tokens = LatentTokens.from_tokenizer(tok)
    coconut = Coconut(model, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id, loss_chunks=loss_chunks)
    return coconut, tokens, tok


def _force_module_path(head):
    """A no-op forward hook: the head is then called as a module per chunk (the ZeRO-3 / LoRA path)."""
    return head.register_forward_hook(lambda module, args, out: None)


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _loss_and_grads(coconut, batch, **kwargs):
    ids, mask, labels, pos = batch
    loss = coconut(ids, mask, labels, pos, **kwargs).loss
    params = _trainable(coconut.base_causallm)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return loss.detach(), {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads)}


def _assert_same(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        # A gradient is a sum over tokens whose terms cancel: the chunked and the full path add them in different
        # orders, so an element near zero differs by fp32 rounding of the tensor's scale, not of its own value.
        scale_atol = max(atol, rtol * b[1][name].abs().max().item())
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=scale_atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", ["fused", "module"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("loss_chunks", [1, 3, 500])  # 500: more chunks than tokens, so some are empty
def test_chunked_loss_equals_full_logits_loss(arch, loss_chunks, path):
    coconut, tokens, _ = _wrap(arch, loss_chunks)
    if path == "module":
        _force_module_path(coconut.base_causallm.get_output_embeddings())
    batch = latent_batch(tokens, *BATCH, seed=1)
    _assert_same(_loss_and_grads(coconut, batch), _loss_and_grads(coconut, batch, return_logits=True))


def test_fused_path_for_a_plain_head_module_path_for_a_hooked_one(monkeypatch):
    """A plain head: one fused sweep, no checkpointed module call; a hooked head: one checkpointed call per chunk."""
    from coconut_scale.model import chunked_loss

    coconut, tokens, _ = _wrap("llama", loss_chunks=4)
    ids, mask, labels, pos = latent_batch(tokens, *BATCH, seed=11)
    calls = []
    checkpoint = chunked_loss.checkpoint
    monkeypatch.setattr(chunked_loss, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    coconut(ids, mask, labels, pos).loss.backward()
    assert calls == []
    _force_module_path(coconut.base_causallm.get_output_embeddings())
    coconut(ids, mask, labels, pos).loss.backward()
    assert len(calls) == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_equals_reference(arch):
    coconut, tokens, _ = _wrap(arch)
    ids, mask, labels, pos = batch = latent_batch(tokens, *BATCH, seed=2)
    chunked = _loss_and_grads(coconut, batch)
    ref_loss = reference_forward(coconut.base_causallm, ids, mask, labels, pos, tokens.latent_id)[0]
    params = _trainable(coconut.base_causallm)
    grads = torch.autograd.grad(ref_loss, [p for _, p in params], allow_unused=True)
    ref = ref_loss.detach(), {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads)}
    _assert_same(chunked, ref, rtol=1e-4, atol=1e-6)  # the reference sums in another order (full recompute)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # gpt2: LoRA's output hook on the tied head
def test_chunked_loss_with_lora(arch):
    coconut, tokens, tok = _wrap(arch)
    apply_lora(coconut, LoraCfg(enabled=True, rank=4, alpha=8, dropout=0.0, target_modules=None), tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters and new rows (they start at zero)
        for _, p in _trainable(coconut.base_causallm):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    batch = latent_batch(tokens, *BATCH, seed=3)
    chunked = _loss_and_grads(coconut, batch)
    assert any(n.endswith("coconut_new_rows.delta") for n in chunked[1])
    _assert_same(chunked, _loss_and_grads(coconut, batch, return_logits=True))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_loss_with_checkpointing(arch):
    coconut, tokens, _ = _wrap(arch)
    batch = latent_batch(tokens, *BATCH, seed=4)
    full = _loss_and_grads(coconut, batch, return_logits=True)
    enable_latent_safe_checkpointing(coconut.base_causallm)
    _assert_same(_loss_and_grads(coconut, batch), full)


def test_training_never_builds_full_logits():
    """Every lm_head call sees at most one chunk of tokens, forward and (recomputed) backward."""
    coconut, tokens, _ = _wrap("llama", loss_chunks=4)
    ids, mask, labels, pos = latent_batch(tokens, *BATCH, seed=5)
    rows_seen = []
    head = coconut.base_causallm.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, out: rows_seen.append(out.reshape(-1, out.shape[-1]).shape[0]))
    out = coconut(ids, mask, labels, pos)
    forward_calls = len(rows_seen)
    out.loss.backward()
    handle.remove()
    batch, width = ids.shape
    assert out.logits is None
    assert forward_calls == 4  # only the loss chunks: the passes run the decoder body alone
    assert len(rows_seen) == forward_calls + 4  # backward recomputes each chunk
    assert max(rows_seen) == math.ceil(batch * (width - 1) / 4) < batch * width


def test_no_labels_gives_zero_loss_with_graph_and_no_nan():
    coconut, tokens, _ = _wrap("gpt2")
    ids, mask, labels, pos = latent_batch(tokens, *BATCH, seed=6)
    out = coconut(ids, mask, torch.full_like(labels, IGNORE_INDEX), pos)
    assert out.loss.item() == 0.0
    out.loss.backward()  # in the graph: every pass's parameters get a (zero) gradient, none is NaN
    grads = [p.grad for p in coconut.base_causallm.parameters()]
    assert all(g is not None and not g.isnan().any() for g in grads)


@pytest.mark.parametrize("path", ["fused", "module"])
def test_chunked_cross_entropy_matches_plain_function(path):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :5] = IGNORE_INDEX
    if path == "module":
        _force_module_path(head)
    plain = shifted_cross_entropy(head(hidden), labels)
    chunked = chunked_shifted_cross_entropy(hidden, labels, head, num_chunks=4)
    torch.testing.assert_close(chunked, plain, rtol=RTOL, atol=ATOL)
    for a, b in zip(torch.autograd.grad(chunked, [hidden, head.weight, head.bias]),
                    torch.autograd.grad(plain, [hidden, head.weight, head.bias])):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="num_chunks"):
        chunked_shifted_cross_entropy(hidden, labels, head, num_chunks=0)


def test_logits_on_request_and_without_labels():
    coconut, tokens, _ = _wrap("llama")
    ids, mask, labels, pos = latent_batch(tokens, *BATCH, seed=7)
    with torch.no_grad():
        asked = coconut(ids, mask, labels, pos, return_logits=True)
        unlabelled = coconut(ids, mask, position_ids=pos)
        default = coconut(ids, mask, labels, pos)
    assert asked.logits.shape == (*ids.shape, coconut.base_causallm.config.vocab_size)
    torch.testing.assert_close(unlabelled.logits, asked.logits)
    torch.testing.assert_close(default.loss, asked.loss, rtol=RTOL, atol=ATOL)
    assert unlabelled.loss is None and default.logits is None


def test_loss_chunks_none_uses_full_logits():
    coconut, tokens, _ = _wrap("llama", loss_chunks=None)
    ids, mask, labels, pos = batch = latent_batch(tokens, *BATCH, seed=10)
    with torch.no_grad():
        out = coconut(ids, mask, labels, pos)
    assert out.logits is not None
    full = _loss_and_grads(coconut, batch)
    coconut.loss_chunks = 3
    _assert_same(_loss_and_grads(coconut, batch), full)


def test_latent_columns_hint_gives_identical_results_without_reading_ids():
    coconut, tokens, _ = _wrap("llama")
    ids, mask, labels, pos = batch = latent_batch(tokens, *BATCH, seed=8)
    columns = latent_columns(ids, tokens.latent_id)
    assert coconut.count_passes(ids, latent_columns=columns) == coconut.count_passes(ids)
    hinted = _loss_and_grads(coconut, batch, latent_columns=columns)
    plain = _loss_and_grads(coconut, batch)
    assert torch.equal(hinted[0], plain[0]) and all(torch.equal(hinted[1][n], plain[1][n]) for n in plain[1])
    # The hint really replaces the read-back: a (wrong) hint changes the plan.
    assert coconut(ids, mask, labels, pos, latent_columns=columns[:-1]).num_passes == len(columns)
    t = tokens
    prompt = torch.tensor([[5, 6, 7, t.start_id, t.latent_id, t.latent_id, t.end_id], [8, 9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        assert torch.equal(coconut.generate(prompt, max_new_tokens=3, latent_columns=[4, 5]),
                           coconut.generate(prompt, max_new_tokens=3))


def test_unknown_keyword_arguments_are_refused():
    coconut, tokens, _ = _wrap("llama")
    ids, mask, labels, pos = latent_batch(tokens, *BATCH, seed=9)
    with pytest.raises(TypeError, match="idx"):
        coconut(ids, mask, labels, pos, idx=torch.arange(ids.shape[0]))
    with pytest.raises(TypeError, match="synced_gpus"):
        coconut.generate(ids, mask, synced_gpus=True)


def test_models_that_transform_their_lm_head_output_are_refused():
    """Gemma's softcapping, Cohere's logit_scale: the loss here is CE of lm_head(hidden), so such a model would
    train on other logits than it generates with; it is refused at wrapping, naming the field and its value."""
    model, tok = tiny_model("llama")
    tokens = LatentTokens.from_tokenizer(tok)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"LlamaConfig\.final_logit_softcapping=30\.0"):
        Coconut(model, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)
    model.config.final_logit_softcapping = None
    model.config.logit_scale = 1.0  # neutral values pass
    Coconut(model, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)
