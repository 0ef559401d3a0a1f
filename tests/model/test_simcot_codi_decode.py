"""decode-latents on SIM-CoT on CODI (evaluate/decode_latents.py, layout "codi"): from CODI's evaluation prompts the
decode path gives the step decoder exactly the input the training step loss gives it for the same record (z_k,
the step's embeddings, positions from 0; the decoder's logits), its greedy decode equals a plain loop on the
training layout written here, and the gold steps are the training targets."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from codi_model import RECORDS, build, hf_model
from coconut_scale.data.codi_data import CodiDataOptions, build_codi_rows
from coconut_scale.data.codi_features import CodiPartCollator, codi_eval_examples, codi_feature, codi_token_ids
from coconut_scale.data.codi_steps import CodiStepCollator, step_ids
from coconut_scale.data.collate import LatentAlignedCollator, left_pad_for_generation
from coconut_scale.evaluate.decode_latents import decode_examples, latent_states
from coconut_scale.model.codi import CodiSpec
from coconut_scale.model.step_supervision import StepSupervision
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import tiny_tokenizer

NUM_LATENT = 2
# Questions of different lengths (left padding differs between the training batch and the prompts); the last
# record has more spans than steps (its tail is joined into z_n's step), the first fewer ([pad] steps: no pair).
MORE = RECORDS + [{"question": "Q: 12 + 30 = ?", "answer": "3",
                   "steps": ["<<1+1=2>>", "<<2+5=7>>", "<<7*2=14>>", "<<14-4=10>>", "<<10-7=3>>"]}]
OPTIONS = CodiDataOptions(lone_space_rule="token")
MAX_NEW = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(arch, tokenizer, tokens):
    model = build(arch, tokenizer, tokens, CodiSpec(num_latent=NUM_LATENT, prj_dim=48))
    torch.manual_seed(1)
    decoder = AutoModelForCausalLM.from_config(hf_model(model).config, dtype=torch.float32, attn_implementation="sdpa")
    model.add_part(StepSupervision(decoder, 1, layout="codi"))
    return model.eval()


def _captured_decoder_calls(decoder):
    calls = []
    handle = decoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(dict(kwargs)),
                                               with_kwargs=True)
    return calls, handle


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    """The model, and what the training step loss fed the decoder for the records' one batch (no dedup bug: every
    row's whole step, the target decode-latents scores against)."""
    tokenizer = tiny_tokenizer()
    tokens = LatentTokens.from_tokenizer(tokenizer)
    model = _model(request.param, tokenizer, tokens)
    part = model.part(StepSupervision.name)
    rows, _ = build_codi_rows(MORE, tokenizer, codi_token_ids(tokens), OPTIONS)
    features = [codi_feature(r, tokens, NUM_LATENT) for r in rows]
    collate = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)
    steps = CodiStepCollator(step_ids(tokenizer, tokens.eos_id, tokens.pad_id), NUM_LATENT, dedup_bug=False)(features)
    part_inputs = {"codi": CodiPartCollator(tokens.pad_id, collate)(features), "step_supervision": steps}
    calls, handle = _captured_decoder_calls(part.decoder)
    with torch.no_grad():
        model(**collate(features), latent_columns=collate.latent_columns(features), part_inputs=part_inputs)
        handle.remove()
        (train,) = calls
        train_logits = part.decoder(**{k: v for k, v in train.items() if k != "logits_to_keep"}).logits  # every column
    return tokenizer, tokens, model, rows, steps, train, train_logits


def test_the_decode_path_feeds_the_decoder_what_the_training_step_loss_feeds_it(setup):
    tokenizer, tokens, model, rows, steps, train, train_logits = setup
    part = model.part(StepSupervision.name)
    examples = codi_eval_examples(MORE, tokenizer, tokens, NUM_LATENT, OPTIONS)
    assert [e["idx"] for e in examples] == [r["index"] for r in rows]
    ids, mask, pos = left_pad_for_generation([e["input_ids"] for e in examples], model.eos_token_id)
    filled, last = latent_states(model, ids, mask, pos)
    rows_t, index_t = steps["step_rows"], steps["step_index"]
    assert sorted(set(index_t.tolist())) == list(range(NUM_LATENT + 1))  # z_n's step is decoded too
    thoughts = part.thoughts(model, ids, filled, rows_t, index_t, last)
    # z_k first: a state or position mismatch shows here, before any decoder call.
    torch.testing.assert_close(thoughts[:, 0], train["inputs_embeds"][:, 0], rtol=1e-5, atol=1e-6)
    embed = model.base_causallm.get_input_embeddings()
    for i in range(rows_t.shape[0]):
        target = steps["step_targets"][i, :int(steps["step_lengths"][i]) + 1]  # the step's ids, its eos last
        assert int(target[-1]) == tokens.eos_id
        # Predicting the step's eos after its ids: the decode path's input is the whole training input.
        dec = part.next_token_inputs(embed, thoughts[i:i + 1], target[None, :-1], tokens.eos_id)
        width = dec.embeds.shape[1]
        assert width == 1 + target.shape[0] and int(train["attention_mask"][i].sum()) == width
        assert dec.attention_mask[0].tolist() == [1] * width
        assert dec.position_ids[0].tolist() == train["position_ids"][i, :width].tolist() == list(range(width))
        torch.testing.assert_close(dec.embeds[0], train["inputs_embeds"][i, :width], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            logits = part.decoder(inputs_embeds=dec.embeds, attention_mask=dec.attention_mask,
                                  position_ids=dec.position_ids).logits[0]
        torch.testing.assert_close(logits, train_logits[i, :width], rtol=1e-4, atol=1e-5)


def _reference_greedy(decoder, embed, thought, eos_id):
    """The training layout's prefix for a step, [z_k, the tokens so far], positions 0.., argmax token by token."""
    tokens = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            seq = torch.cat([thought, embed(torch.tensor(tokens, dtype=torch.long))], dim=0)[None]
            logits = decoder(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]).logits
            token = int(logits[0, -1].argmax())
            if token == eos_id:
                break
            tokens.append(token)
    return tokens


@pytest.mark.parametrize("batch_size", [4, 3])
def test_greedy_decode_and_gold_equal_a_plain_loop_on_the_training_layout(setup, batch_size):
    tokenizer, tokens, model, rows, steps, train, _ = setup
    part = model.part(StepSupervision.name)
    examples = codi_eval_examples(MORE, tokenizer, tokens, NUM_LATENT, OPTIONS)
    decoded = decode_examples(model, tokenizer, examples, NUM_LATENT, batch_size, MAX_NEW, None)
    got = {(r["idx"], r["step"]): r for r in decoded}
    embed = model.base_causallm.get_input_embeddings()
    expected = {}
    for i, (r, k) in enumerate(zip(steps["step_rows"].tolist(), steps["step_index"].tolist())):
        ids = _reference_greedy(part.decoder, embed, train["inputs_embeds"][i, :1], tokens.eos_id)
        gold = steps["step_targets"][i, :int(steps["step_lengths"][i])].tolist()  # the training target, no eos
        expected[(rows[r]["index"], k)] = (tokenizer.decode(gold).strip(), tokenizer.decode(ids).strip())
    assert got.keys() == expected.keys()  # one row per training pair: [pad] steps have none
    assert len(got) == len(decoded)
    for key, (gold, text) in expected.items():
        assert (got[key]["gold"], got[key]["decoded"]) == (gold, text), key
        assert got[key]["exact"] == (gold == text)
    assert got[(3, NUM_LATENT)]["gold"] == "<<7*2=14>> <<14-4=10>>"  # the tail joined; the last CoT step dropped


def test_a_codi_export_without_its_decoder_is_refused_naming_what_trains_one(tmp_path):
    from coconut_scale.evaluate.decode_latents import main as decode_main
    from coconut_scale.evaluate.runtime import InputError
    from coconut_scale.model.export_meta import ExportMeta

    tokens = LatentTokens.from_tokenizer(tiny_tokenizer())
    ExportMeta(c_thought=1, tokens=tokens, stage=NUM_LATENT, max_latent_stage=NUM_LATENT, method="codi",
               codi={"num_latent": NUM_LATENT}).write(tmp_path)
    with pytest.raises(InputError, match=r"step_supervision.json not found.*method codi export.*"
                                         r"coconut.step_supervision.enabled: true"):
        decode_main([str(tmp_path), str(tmp_path / "data.json")])
