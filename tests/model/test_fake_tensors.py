"""The model code runs on tensors without values (fake or meta: check --measure, torch.compile, ZeRO-3 placeholders),
and the KV cache keeps the forward's record of each pass, never a recompute's."""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from coconut_scale.config.fake_model import to_fake
from coconut_scale.data.collate import left_pad_for_generation
from coconut_scale.model.coconut import Coconut
from coconut_scale.model.kv_cache import PassCache
from coconut_scale.model.step_supervision import decoder_inputs, step_loss_from_hidden
from coconut_scale.testing import latent_batch
from coconut_scale.model.tokens import LatentTokens, resize_and_init_embeddings
from coconut_scale.testing import tiny_config, tiny_model, tiny_tokenizer


def _fake_coconut(arch="llama"):
    """A tiny Coconut built on the meta device, then on fake tensors (as check --measure builds the real shapes)."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    mode = FakeTensorMode()
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tok), eos_id=tok.eos_token_id))
    to_fake(base, mode)
    tokens = LatentTokens.from_tokenizer(tok)
    return Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id), tokens, mode


def test_the_cache_keeps_the_forward_record_when_a_recompute_updates_again():
    cache = PassCache(num_layers=1)
    forward_k, forward_v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    cache.update(forward_k, forward_v, 0)
    recomputed_k, recomputed_v = forward_k.clone(), forward_v.clone()  # what checkpointing's recompute passes
    keys, _ = cache.update(recomputed_k, recomputed_v, 0)
    assert keys is recomputed_k  # the recompute computes with its own tensors...
    layer = cache.layers[0]
    assert layer.new_keys is forward_k and layer.new_values is forward_v  # ...but the record stays the forward's


def test_an_untied_head_is_initialised_whatever_the_storage_addresses_say():
    """Meta tensors (as ZeRO-3's placeholders) all report data_ptr() 0: the head must still get its new rows."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok) - 3, eos_id=0))
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    touched = []

    def gather(params):
        touched.extend(params)
        return contextlib.nullcontext()

    resize_and_init_embeddings(model, tok, gather=gather)
    assert any(p is model.get_output_embeddings().weight for p in touched)


def test_the_step_loss_runs_on_fake_tensors():
    mode = FakeTensorMode()
    with mode:
        n, c, lt, h, v = 5, 2, 6, 16, 50
        embed = torch.nn.Embedding(v, h)
        head = torch.nn.Linear(h, v, bias=False)
        targets = torch.randint(0, v, (n, lt))
        lengths = torch.randint(1, lt - 1, (n,))
        steps = torch.tensor([0, 1, 0, 1, 2])
        inputs = decoder_inputs(torch.randn(n, c, h, requires_grad=True), embed, targets, lengths)
        hidden = torch.randn(n, inputs.embeds.shape[1], h, requires_grad=True)
        loss = step_loss_from_hidden(hidden, head, inputs, steps)
        loss.backward()
    assert loss.shape == () and hidden.grad.shape == hidden.shape


def test_the_pass_plan_of_a_fake_batch_needs_the_collators_columns():
    coconut, tokens, mode = _fake_coconut()
    ids, mask, labels, pos = latent_batch(tokens, [2, 2], [5, 5])
    columns = [c for c in range(ids.shape[1]) if bool((ids[:, c] == tokens.latent_id).any())]
    with mode:
        fake = [mode.from_tensor(t) for t in (ids, mask, labels, pos)]
        with pytest.raises(ValueError, match="latent_columns="):
            coconut(*fake)
        out = coconut(*fake, latent_columns=columns)
        out.loss.backward()
    assert out.num_passes == len(columns) + 1


def test_fixed_length_generation_reads_nothing_back_and_writes_what_stopping_writes():
    coconut, tokens = _real_coconut()
    rows = [[5, 6, 7, tokens.start_id, tokens.latent_id, tokens.end_id], [8, 9, tokens.start_id, tokens.latent_id,
                                                                             tokens.end_id]]
    ids, mask, pos = left_pad_for_generation(rows, tokens.pad_id)
    columns = [c for c in range(ids.shape[1]) if bool((ids[:, c] == tokens.latent_id).any())]
    stopping = coconut.generate(ids, mask, max_new_tokens=8, position_ids=pos)
    fixed = coconut.generate(ids, mask, max_new_tokens=8, position_ids=pos, stop_at_eos=False)
    assert fixed.shape[1] == ids.shape[1] + 8
    assert torch.equal(fixed[:, :stopping.shape[1]], stopping)
    assert (fixed[:, stopping.shape[1]:] == tokens.eos_id).all()

    fake_model, fake_tokens, mode = _fake_coconut()
    with mode:
        out = fake_model.generate(*(mode.from_tensor(t) for t in (ids, mask)), max_new_tokens=4,
                                  position_ids=mode.from_tensor(pos), latent_columns=columns, stop_at_eos=False)
    assert out.shape == (2, ids.shape[1] + 4)


def _real_coconut():
    base, tok = tiny_model("llama", seed=3)
    tokens = LatentTokens.from_tokenizer(tok)
    base.config.eos_token_id = tokens.eos_id
    coconut = Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id).eval()
    # An EOS that the free-running greedy decode emits early, so that stopping actually stops.
    with torch.no_grad():
        base.get_output_embeddings().weight[tokens.eos_id] *= 40
    return coconut, tokens
