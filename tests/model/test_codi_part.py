"""`method: codi` (model/codi.py on the Coconut core) against the per-row reference of the released code
(codi_reference.py, each row on its own tokens), in fp32 on tiny GPT-2 and Llama: every loss term and every
gradient, with and without LoRA and latent-safe checkpointing; and batched generation against their test.py's
greedy loop row by row."""

import pytest
import torch

from codi_model import NUM_LATENT, RECORDS, build, grads, hf_model
from codi_reference import CodiSettings, codi_losses, greedy_answer
from coconut_scale.data.codi_data import CodiCollator, CodiDataOptions, build_codi_rows
from coconut_scale.data.codi_features import CodiPartCollator, codi_eval_examples, codi_feature, codi_token_ids
from coconut_scale.data.collate import LatentAlignedCollator, left_pad_for_generation
from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
from coconut_scale.model.codi import CodiSpec
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import tiny_tokenizer
from coconut_scale.train.losses import training_loss

WEIGHTS = {"distill": 20.0, "teacher": 0.5}  # distill_loss_factor (the Llama-1B script), ref_loss_factor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return LatentTokens.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def rows(tokenizer, tokens):
    built, summary = build_codi_rows(RECORDS, tokenizer, codi_token_ids(tokens), CodiDataOptions(lone_space_rule="token"))
    assert summary.kept == len(RECORDS)
    return built


def ours(model, features, tokens):
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    batch = collate(features)
    inputs = CodiPartCollator(tokens.pad_id, collate)(features)
    out = model(**batch, latent_columns=collate.latent_columns(features), part_inputs={"codi": inputs})
    return out, training_loss(out, WEIGHTS)


def reference(model, rows, tokens, spec):
    settings = CodiSettings(num_latent=spec.num_latent, distill_loss_factor=WEIGHTS["distill"],
                            ref_loss_factor=WEIGHTS["teacher"], distill_loss_type=spec.distill_loss_type,
                            distill_loss_div_std=spec.distill_loss_div_std, strip_padding=True)
    return codi_losses(hf_model(model), model.part("codi").prj, CodiCollator(tokens.pad_id)(rows), settings)


def _close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
def test_every_term_and_gradient_equals_the_per_row_reference(arch, lora, checkpointing, tokenizer, tokens, rows):
    spec = CodiSpec(num_latent=NUM_LATENT, prj_dim=48)
    model = build(arch, tokenizer, tokens, spec, lora=lora)
    ref = reference(model, rows, tokens, spec)  # before checkpointing: the reference's DynamicCache needs it off
    ref.total.backward()
    ref_grads = grads(model)
    if checkpointing:
        assert enable_latent_safe_checkpointing(model.base_causallm) > 0
    out, total = ours(model, [codi_feature(r, tokens, NUM_LATENT) for r in rows], tokens)
    total.backward()
    our_grads = grads(model)
    _close(out.loss, ref.student_ce)
    _close(out.terms["teacher"], ref.teacher_ce)
    _close(out.terms["distill"], ref.distill)
    _close(total, ref.total)
    assert our_grads.keys() == ref_grads.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("codi.prj.")} <= our_grads.keys()
    assert len(our_grads) == len(trainable)  # every trainable parameter gets a gradient
    for name in ref_grads:
        assert ref_grads[name].abs().sum() > 0, name
        _close(our_grads[name], ref_grads[name])


@pytest.mark.parametrize("loss_type", ["smooth_l1", "l2"])
@pytest.mark.parametrize("div_std", [True, False])
@pytest.mark.parametrize("prj", ["ln", "no_ln", "none"])
def test_switches_follow_the_reference(loss_type, div_std, prj, tokenizer, tokens, rows):
    spec = CodiSpec(num_latent=NUM_LATENT, prj_dim=40, use_prj=prj != "none", prj_no_ln=prj == "no_ln",
                    distill_loss_type=loss_type, distill_loss_div_std=div_std)
    model = build("llama", tokenizer, tokens, spec)
    with torch.no_grad():
        ref = reference(model, rows, tokens, spec)
        out, total = ours(model, [codi_feature(r, tokens, NUM_LATENT) for r in rows], tokens)
    _close(out.terms["distill"], ref.distill)
    _close(total, ref.total)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_generation_equals_their_greedy_loop_row_by_row(arch, tokenizer, tokens):
    model = build(arch, tokenizer, tokens).eval()
    model.suppressed_token_ids = (tokens.end_id,)
    examples = codi_eval_examples(RECORDS, tokenizer, tokens, NUM_LATENT, CodiDataOptions(lone_space_rule="token"))
    ids, mask, pos = left_pad_for_generation([e["input_ids"] for e in examples], tokens.pad_id)
    batched = model.generate(ids, mask, max_new_tokens=12, position_ids=pos)[:, ids.shape[1]:].tolist()
    prj = model.part("codi").prj
    for example, row in zip(examples, batched):
        question = example["input_ids"][:-(NUM_LATENT + 2)]
        theirs = greedy_answer(hf_model(model), prj, question, tokens.start_id, tokens.end_id, tokens.eos_id,
                               NUM_LATENT, max_new_tokens=12)
        assert tokens.end_id not in row
        mine = row[:row.index(tokens.eos_id) + 1] if tokens.eos_id in row else row
        assert mine == theirs
