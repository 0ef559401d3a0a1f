"""SIM-CoT on CODI: the step-supervision part (model/step_supervision.py, layout "codi") on CODI's latents z_0..z_n,
with its steps cut from the teacher ids (data/codi_steps.py), against the per-row reference of their code
(simcot_reference.py on codi_reference.py's latents), with and without their dedup bug: the step loss, the total
and every gradient, in fp32 on tiny GPT-2 and Llama, with and without LoRA."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from codi_reference import CodiSettings, codi_losses
from simcot_reference import get_steps as reference_get_steps, pad_steps, step_decoder_loss
from codi_model import RECORDS, build, grads, hf_model
from coconut_scale.data.codi_data import CodiCollator, CodiDataOptions, build_codi_rows
from coconut_scale.data.codi_features import CodiPartCollator, codi_feature, codi_token_ids
from coconut_scale.data.codi_steps import PAD, CodiStepCollator, get_steps, step_ids
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.model.codi import CodiSpec
from coconut_scale.model.step_supervision import StepSupervision
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import tiny_tokenizer
from coconut_scale.train.losses import training_loss

NUM_LATENT = 2
MORE = RECORDS + [{"question": "Q: 12 + 30 = ?", "answer": "3",
                   "steps": ["<<1+1=2>>", "<<2+5=7>>", "<<7*2=14>>", "<<14-4=10>>", "<<10-7=3>>"]}]
WEIGHTS = {"distill": 20.0, "teacher": 0.5, "step": 0.7}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    tokens = LatentTokens.from_tokenizer(tokenizer)
    rows, _ = build_codi_rows(MORE, tokenizer, codi_token_ids(tokens), CodiDataOptions(lone_space_rule="token"))
    return tokenizer, tokens, rows


def test_steps_equal_the_reference_cut(setup):
    tokenizer, tokens, rows = setup
    ids = step_ids(tokenizer, tokens.eos_id, tokens.pad_id)
    teacher = [r["teacher_input_ids"] for r in rows]
    ours = get_steps(teacher, NUM_LATENT + 1, ids)
    theirs = reference_get_steps(teacher, NUM_LATENT + 1, ids.start_ids, ids.end_id, tokens.eos_id, PAD, (tokens.eos_id,))
    assert ours == theirs
    assert [sum(s != [PAD] for s in row) for row in ours] == [1, 1, 2, 3]  # the last CoT step is dropped; 4 -> 3 merged


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("dedup_bug", [True, False], ids=["bug", "nobug"])
def test_step_loss_total_and_gradients_equal_the_reference(arch, lora, dedup_bug, setup):
    tokenizer, tokens, rows = setup
    model = build(arch, tokenizer, tokens, CodiSpec(num_latent=NUM_LATENT, prj_dim=48, distill_loss_div_std=False),
                  lora=lora)
    torch.manual_seed(1)  # their decoder: a second, fully trainable model of the base's shape, never LoRA-wrapped
    decoder = AutoModelForCausalLM.from_config(hf_model(model).config, dtype=torch.float32, attn_implementation="sdpa")
    model.add_part(StepSupervision(decoder, 1, layout="codi"))
    ids = step_ids(tokenizer, tokens.eos_id, tokens.pad_id)

    settings = CodiSettings(num_latent=NUM_LATENT, distill_loss_factor=WEIGHTS["distill"],
                            ref_loss_factor=WEIGHTS["teacher"], distill_loss_div_std=False, strip_padding=True)
    ref = codi_losses(hf_model(model), model.part("codi").prj, CodiCollator(tokens.pad_id)(rows), settings)
    teacher = [r["teacher_input_ids"] for r in rows]
    padded = pad_steps(reference_get_steps(teacher, NUM_LATENT + 1, ids.start_ids, ids.end_id, tokens.eos_id, PAD,
                                           (tokens.eos_id,)), PAD)
    explain, step_ces = step_decoder_loss(decoder, hf_model(model).get_input_embeddings(), ref.latents, padded, PAD,
                                          dedup_bug=dedup_bug)
    assert sum(ce is not None for ce in step_ces) == NUM_LATENT + 1  # z_n is supervised too
    ref_total = ref.total + WEIGHTS["step"] * explain
    ref_total.backward()
    ref_grads = grads(model)

    features = [codi_feature(r, tokens, NUM_LATENT) for r in rows]
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    batch = collate(features)
    part_inputs = {"codi": CodiPartCollator(tokens.pad_id, collate)(features),
                   "step_supervision": CodiStepCollator(ids, NUM_LATENT, dedup_bug)(features)}
    out = model(**batch, latent_columns=collate.latent_columns(features), part_inputs=part_inputs)
    total = training_loss(out, WEIGHTS)
    total.backward()
    our_grads = grads(model)
    torch.testing.assert_close(out.terms["step"], explain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == ref_grads.keys()
    assert any(n.startswith("step_supervision.decoder.") for n in our_grads)
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_the_dedup_bug_changes_the_loss(setup):
    tokenizer, tokens, rows = setup
    ids = step_ids(tokenizer, tokens.eos_id, tokens.pad_id)
    features = [codi_feature(r, tokens, NUM_LATENT) for r in rows]
    bug, fixed = CodiStepCollator(ids, NUM_LATENT, True)(features), CodiStepCollator(ids, NUM_LATENT, False)(features)
    assert (bug["step_lengths"] < fixed["step_lengths"]).any()  # rows cut to row 0's step length
