"""The per-row CODI reference (codi_reference.py) pinned to the released code's semantics, on tiny GPT-2 and
Llama in fp32 on CPU: it equals a batched transcription of zhenyi4/codi src/model.py:276-400, and the properties
the notes derive from that code hold (distillation entry 0, the weighted total, the std division, where the
gradients go, what padding changes, greedy inference)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from codi_model import NUM_LATENT, RECORDS
from codi_reference import CodiSettings, codi_losses, codi_projection, greedy_answer, student_row
from codi_released_port import released_codi_forward
from coconut_scale.data.codi_data import CodiCollator, CodiDataOptions, CodiTokenIds, build_codi_rows
from coconut_scale.testing import tiny_config, tiny_tokenizer

ARCHS = ["gpt2", "llama"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(with_latent_tokens=False)


@pytest.fixture(scope="module")
def codi_ids(tokenizer):
    vocab = len(tokenizer)  # the released layout: pad, bot, eot right after the base vocabulary
    return CodiTokenIds(pad_id=vocab, bot_id=vocab + 1, eot_id=vocab + 2, eos_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def rows(tokenizer, codi_ids):
    built, summary = build_codi_rows(RECORDS, tokenizer, codi_ids, CodiDataOptions(lone_space_rule="token"))
    assert summary.kept == len(RECORDS)
    return built


@pytest.fixture(scope="module")
def batch(rows, codi_ids):
    return CodiCollator(codi_ids.pad_id)(rows)


@pytest.fixture(scope="module", params=ARCHS)
def model_and_prj(request, codi_ids):
    torch.manual_seed(0)
    # pad_token_id None as in Llama-3's config: no embedding row is a zero padding_idx row.
    config = tiny_config(request.param, vocab_size=codi_ids.eot_id + 1, eos_id=codi_ids.eos_id, pad_token_id=None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    prj = codi_projection(config.hidden_size, 48)
    return request.param, model, prj


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("fix_attn_mask", [False, True])
def test_per_row_reference_equals_the_released_batched_forward(model_and_prj, batch, fix_attn_mask):
    _, model, prj = model_and_prj
    settings = CodiSettings(num_latent=NUM_LATENT, fix_attn_mask=fix_attn_mask)
    assert len(set(batch["encoder_attention_mask"].sum(1).tolist())) > 1  # rows really are left-padded
    with torch.no_grad():
        ours = codi_losses(model, prj, batch, settings)
        total, ce, distill, ref_ce = released_codi_forward(model, prj, batch, settings)
    for mine, theirs in ((ours.total, total), (ours.student_ce, ce), (ours.distill, distill),
                         (ours.teacher_ce, ref_ce)):
        _close(mine, theirs)


def test_a_batch_of_one_row_is_the_row_alone(model_and_prj, rows, codi_ids):
    _, model, prj = model_and_prj
    one = CodiCollator(codi_ids.pad_id)(rows[1:2])
    with torch.no_grad():
        released = released_codi_forward(model, prj, one, CodiSettings(num_latent=NUM_LATENT))[0]
        padded_layout = codi_losses(model, prj, one, CodiSettings(num_latent=NUM_LATENT)).total
        own_tokens = codi_losses(model, prj, one, CodiSettings(num_latent=NUM_LATENT, strip_padding=True)).total
    _close(padded_layout, released)
    _close(own_tokens, released)


def _more_padding(batch, pad_id, extra=3):
    """The same rows with `extra` more pads: on the left of the encoder ids, on the right of the others."""
    out = dict(batch)
    n = batch["encoder_input_ids"].shape[0]
    pads = torch.full((n, extra), pad_id, dtype=torch.long)
    zeros, ignore = torch.zeros((n, extra), dtype=torch.long), torch.full((n, extra), -100, dtype=torch.long)
    out["encoder_input_ids"] = torch.cat([pads, batch["encoder_input_ids"]], 1)
    out["encoder_attention_mask"] = torch.cat([zeros, batch["encoder_attention_mask"]], 1)
    for key, fill in (("teacher_input_ids", pads), ("teacher_attention_mask", zeros), ("teacher_labels", ignore),
                      ("decoder_input_ids", pads), ("labels", ignore)):
        out[key] = torch.cat([batch[key], fill], 1)
    return out


def _first_fed_latent_outputs(model, prj, batch, settings):
    """Per row z_1, the output of the first latent pass: the first to run without a mask."""
    return torch.cat([row[1] for row in codi_losses(model, prj, batch, settings).latents])


def test_left_padding_changes_the_released_latents_and_not_the_per_row_ones(model_and_prj, batch, codi_ids):
    # Released: the latent passes attend to the pad keys (no mask; fix_attn_mask masks the answer pass only).
    # Per-row (strip_padding) sees no padding at all.
    _, model, prj = model_and_prj
    padded = _more_padding(batch, codi_ids.pad_id)
    with torch.no_grad():
        for fix in (False, True):
            released = CodiSettings(num_latent=NUM_LATENT, fix_attn_mask=fix)
            change = _first_fed_latent_outputs(model, prj, padded, released) \
                - _first_fed_latent_outputs(model, prj, batch, released)
            assert change.abs().max() > 1e-3
        intended = CodiSettings(num_latent=NUM_LATENT, strip_padding=True)
        _close(codi_losses(model, prj, padded, intended).total, codi_losses(model, prj, batch, intended).total)
        _close(_first_fed_latent_outputs(model, prj, padded, intended),
               _first_fed_latent_outputs(model, prj, batch, intended))


def test_distillation_entry_zero_is_exactly_zero_for_llama_only(model_and_prj, batch):
    # Entry 0 is the embedding output at ':' on both sides: Llama has no position embedding, GPT-2 adds wpe
    # at two different positions.
    arch, model, prj = model_and_prj
    with torch.no_grad():
        losses = codi_losses(model, prj, batch, CodiSettings(num_latent=NUM_LATENT))
    assert len(losses.distill_per_entry) == model.config.num_hidden_layers + 1
    if arch == "llama":
        assert float(losses.distill_per_entry[0]) == 0.0
    else:
        assert float(losses.distill_per_entry[0]) > 1e-4
    assert all(float(d) > 1e-4 for d in losses.distill_per_entry[1:])


def test_total_is_student_ce_plus_weighted_distill_and_teacher_ce(model_and_prj, batch):
    _, model, prj = model_and_prj
    with torch.no_grad():
        plain = codi_losses(model, prj, batch, CodiSettings(num_latent=NUM_LATENT))
        weighted = codi_losses(model, prj, batch, CodiSettings(num_latent=NUM_LATENT, distill_loss_factor=20.0,
                                                               ref_loss_factor=0.5))
    for term in ("student_ce", "distill", "teacher_ce"):
        _close(getattr(weighted, term), getattr(plain, term))
    _close(weighted.total, plain.student_ce + 20.0 * plain.distill + 0.5 * plain.teacher_ce)
    _close(plain.total, plain.student_ce + plain.distill + plain.teacher_ce)


def _teacher_targets(model, batch):
    """Per hidden-state entry, the teacher's [B, H] vectors at the teacher answer positions."""
    with torch.no_grad():
        hidden = model(input_ids=batch["teacher_input_ids"], output_hidden_states=True).hidden_states
    rows = torch.arange(batch["teacher_input_ids"].shape[0])
    return [h[rows, batch["teacher_answer_position"]] for h in hidden]


@pytest.mark.parametrize("loss_type, power", [("smooth_l1", 1), ("l2", 2)])
def test_std_division_is_by_the_unbiased_std_of_all_target_values(model_and_prj, batch, loss_type, power):
    _, model, prj = model_and_prj
    with torch.no_grad():
        divided = codi_losses(model, prj, batch, CodiSettings(num_latent=NUM_LATENT, distill_loss_type=loss_type))
        raw = codi_losses(model, prj, batch, CodiSettings(num_latent=NUM_LATENT, distill_loss_type=loss_type,
                                                          distill_loss_div_std=False))
    for d, r, target in zip(divided.distill_per_entry, raw.distill_per_entry, _teacher_targets(model, batch)):
        _close(d * target.std(unbiased=True) ** power, r)


def _token_rows_only_in_teacher(batch):
    teacher = set(batch["teacher_input_ids"].flatten().tolist())
    student = set(batch["encoder_input_ids"].flatten().tolist()) | set(batch["decoder_input_ids"].flatten().tolist())
    only = sorted(teacher - student)
    assert only, "the CoT must hold tokens the question and the answer do not"
    return only


def test_gradients_reach_prj_and_the_latent_chain_but_not_the_distillation_target(model_and_prj, batch):
    _, model, prj = model_and_prj
    settings = CodiSettings(num_latent=NUM_LATENT)
    losses = codi_losses(model, prj, batch, settings)
    for latents in losses.latents:
        for z in latents:
            z.retain_grad()
    embedding = model.get_input_embeddings().weight
    # CoT-only tokens reach the loss only through the teacher; its no-grad pass gives the distillation targets.
    teacher_only = _token_rows_only_in_teacher(batch)
    losses.distill.backward(retain_graph=True)
    assert embedding.grad is not None and embedding.grad[teacher_only].abs().sum() == 0
    embedding.grad = None
    losses.teacher_ce.backward(retain_graph=True)
    assert embedding.grad[teacher_only].abs().sum() > 0
    losses.student_ce.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prj.parameters())
    for latents in losses.latents:
        # z_0 .. z_{n-1} were fed (the answer depends on all of them, through the cache); z_n never was.
        assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in latents[:-1])
        assert latents[-1].grad is None


def _boost_logits(model, bonus: dict):
    bias = torch.zeros(model.config.vocab_size)
    for token, value in bonus.items():
        bias[token] = value
    return model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)


def test_greedy_stops_at_eos_and_never_emits_eot(model_and_prj, rows, codi_ids):
    _, model, prj = model_and_prj
    question = rows[0]["encoder_input_ids"][:-1]
    args = (model, prj, question, codi_ids.bot_id, codi_ids.eot_id, codi_ids.eos_id, NUM_LATENT)
    hook = _boost_logits(model, {codi_ids.eot_id: 200.0, codi_ids.eos_id: 100.0})
    try:
        assert greedy_answer(*args, max_new_tokens=8) == [codi_ids.eos_id]
    finally:
        hook.remove()
    hook = _boost_logits(model, {codi_ids.eot_id: 200.0, codi_ids.eos_id: -200.0})
    try:
        generated = greedy_answer(*args, max_new_tokens=8)
    finally:
        hook.remove()
    assert len(generated) == 8 and codi_ids.eot_id not in generated and codi_ids.eos_id not in generated


def test_greedy_tokens_are_the_argmax_of_the_training_answer_pass(model_and_prj, rows, codi_ids):
    # Inference feeds the same question, bot, latents and eot at the same positions as training's student.
    _, model, prj = model_and_prj
    question = rows[2]["encoder_input_ids"][:-1]
    generated = greedy_answer(model, prj, question, codi_ids.bot_id, codi_ids.eot_id, codi_ids.eos_id,
                              NUM_LATENT, max_new_tokens=6)
    encoder = torch.tensor(question + [codi_ids.bot_id])
    decoder = torch.tensor([codi_ids.eot_id] + generated)
    with torch.no_grad():
        answer, _ = student_row(model, prj, encoder, torch.ones_like(encoder), decoder, NUM_LATENT)
    logits = answer.logits[0, :len(generated)].clone()
    logits[:, codi_ids.eot_id] = float("-inf")
    assert logits.argmax(-1).tolist() == generated
