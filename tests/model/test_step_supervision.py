"""Step supervision (SIM-CoT): targets, the batched decoder loss against a plain reference written from SIM-CoT's
code (InternLM/SIM-CoT, Coconut/coconut.py, CoconutGPT_Same_Word_Embedding.forward, explain_mode v1_aug), with
checkpointing and LoRA; the recipe switch."""

import pytest
import torch
import torch.nn.functional as F

from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.data.curriculum import CurriculumConfig, build_train_example
from coconut_scale.data.step_targets import StepPieces, StepTargetCollator, step_targets
from coconut_scale.data.tokenized import tokenize_records
from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
from coconut_scale.model.coconut import Coconut
from coconut_scale.model.reference import reference_filled_embeddings, reference_forward
from coconut_scale.model.lora import wrap_with_lora
from coconut_scale.model.spec import LoraSpec
from coconut_scale.model.step_supervision import STEP_KEYS, StepSupervision, decoder_inputs
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import tiny_model
from coconut_scale.train.losses import training_loss

RTOL, ATOL = 1e-5, 1e-6  # fp32; atol for gradient entries near 0 (summation order)

RECORDS = [
    {"question": "Tom has 3 apples and 4 more?", "steps": ["<<3+4=7>>"], "answer": "7"},
    {"question": "Janet had 12 and 30?", "steps": ["<<12+30=42>>", "<<42*2=84>>"], "answer": "84"},
    {"question": "Alex is a rempus. Is Alex a lempus?", "steps": ["Every rempus is a lempus.", "Alex is a lempus.",
                                                                 "yes"], "answer": "True"},
    {"question": "Q: 1 + 2 = ?", "steps": ["<<1+2=3>>", "<<3*3=9>>", "<<9-1=8>>", "<<8/2=4>>"], "answer": "4"},
]


# -- the reference: SIM-CoT's loop, per step then per row, one decoder call per step ---------------------------
def reference_step_loss(base, decoder, input_ids, attention_mask, position_ids, latent_id, c_thought, targets_per_row,
                        eos_id, prompt_ids=None):
    """SIM-CoT's decoder loss. `targets_per_row[r]` lists row r's target token lists (their input_united_tokens
    without the -570 thought placeholders and EOS). Rows may have different step counts: their code reads the
    count from row 0; here a step is decoded by the rows that have it and K is the largest count."""
    embeds = reference_filled_embeddings(base, input_ids, attention_mask, position_ids, latent_id)
    embedding = base.get_input_embeddings()
    latent_lists = [[j for j in range(input_ids.shape[1]) if int(input_ids[i, j]) == latent_id]
                    for i in range(input_ids.shape[0])]
    n_steps = max(len(t) for t in targets_per_row)
    total = 0.0
    for k in range(n_steps):
        rows = [r for r in range(len(targets_per_row)) if len(targets_per_row[r]) > k]
        prompt = list(prompt_ids(k)) if prompt_ids else []
        united = [[-570] * (len(prompt) + c_thought) + targets_per_row[r][k] + [eos_id] for r in rows]
        width = max(len(u) for u in united) + 1
        united = [u + [eos_id] * (width - len(u)) for u in united]
        seqs, masks, positions, labels = [], [], [], []
        for r, u in zip(rows, united):
            thoughts = embeds[r, latent_lists[r][k * c_thought:(k + 1) * c_thought]]
            parts = [embedding(torch.tensor(prompt, dtype=torch.long))] if prompt else []
            parts += [thoughts, embedding(torch.tensor(u[len(prompt) + c_thought:]))]
            seqs.append(torch.cat(parts))
            first_eos = u.index(eos_id)
            mask = torch.zeros(width, dtype=torch.long)
            mask[:first_eos + 1] = 1
            masks.append(mask)
            positions.append(torch.arange(1, width + 1))
            lab = torch.tensor(u)
            keep = (lab != -570) & (lab != eos_id)
            keep[first_eos] = True
            lab[~keep] = -100
            labels.append(lab)
        logits = decoder(inputs_embeds=torch.stack(seqs), attention_mask=torch.stack(masks),
                         position_ids=torch.stack(positions)).logits
        labels = torch.stack(labels)
        effective = float((labels != -100).sum(dim=1).bool().sum())
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               reduction="sum")
        total = total + loss / effective
    return total / n_steps


# -- fixtures -------------------------------------------------------------------------------------------------
def _setup(arch, c_thought, decoder_kind, seed=0):
    base, tok = tiny_model(arch, seed=seed)
    tokens = LatentTokens.from_tokenizer(tok)
    model = Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)
    decoder = tiny_model(arch, seed=seed + 7)[0] if decoder_kind == "copy" else None
    model.add_part(StepSupervision(decoder, c_thought))
    return model, tok, tokens


def _part(model) -> StepSupervision:
    return model.part(StepSupervision.name)


def _forward(model, batch):
    """The trainer's call: the core batch, the step tensors as the part's inputs; returns (output, total loss)."""
    core = {k: v for k, v in batch.items() if k not in STEP_KEYS}
    steps = {k: v for k, v in batch.items() if k in STEP_KEYS}
    out = model(**core, part_inputs={StepSupervision.name: steps})
    return out, training_loss(out, {"step": 1.0})


def _batch(tok, tokens, cfg, stages, records=RECORDS, prompt=None):
    recs = tokenize_records(records, tok)
    examples = [build_train_example(r, s, cfg, tokens) for r, s in zip(recs, stages)]
    batch = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)(examples)
    steps = StepTargetCollator.from_records(recs, tok, cfg, prompt=prompt)
    batch.update(steps(examples))
    return batch, [steps.row_targets(e) for e in examples], steps


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g)
            for (n, p), g in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads)}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


# Stage 4 > max_latent_stage 3 without padding: rows get 1, 2, 3, 3 latent steps (the last joins steps 3 and 4).
CASES = [
    (CurriculumConfig(c_thought=1, max_latent_stage=3), [4, 4, 4, 4]),
    (CurriculumConfig(c_thought=2, max_latent_stage=3), [4, 4, 4, 4]),
    (CurriculumConfig(c_thought=2, max_latent_stage=3), [2, 2, 1, 3]),  # row 0 has 1 step at stage 2: the answer
]


# -- targets --------------------------------------------------------------------------------------------------
def test_targets_follow_simcot_joining_and_answer_padding():
    pieces = StepPieces(steps=((1,), (2, 2), (3,), (4,)), answer=(9, 9))
    sep = [5]
    assert step_targets(pieces, 2, 2, 3, sep) == [[1], [2, 2]]
    assert step_targets(pieces, 4, 3, 3, sep) == [[1], [2, 2], [3, 5, 4]]  # steps 3.. share the last target
    assert step_targets(pieces, 3, 3, 3, sep) == [[1], [2, 2], [3]]  # stage 3: only the replaced steps
    one = StepPieces(steps=((1,),), answer=(9, 9))
    assert step_targets(one, 1, 3, 3, sep) == [[1], [9, 9], [9, 9]]  # missing steps decode the answer
    assert step_targets(one, 1, 1, 1, sep) == [[1]]


def test_collator_is_flat_over_rows_of_different_step_counts():
    _, tok, tokens = _setup("gpt2", 1, "shared")
    cfg, stages = CASES[0]
    batch, per_row, _ = _batch(tok, tokens, cfg, stages)
    assert [len(t) for t in per_row] == [1, 2, 3, 3]
    assert batch["step_rows"].tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch["step_index"].tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2]
    assert tok.decode(batch["step_targets"][-1, :batch["step_lengths"][-1]]) == "<<9-1=8>>\n<<8/2=4>>"
    # every row's EOS slot exists
    assert int(batch["step_lengths"].max()) < batch["step_targets"].shape[1]


# -- exactness -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("decoder_kind", ["copy", "shared"])
def test_loss_and_every_gradient_equal_the_reference(arch, case, decoder_kind):
    cfg, stages = CASES[case]
    model, tok, tokens = _setup(arch, cfg.c_thought, decoder_kind)
    batch, per_row, _ = _batch(tok, tokens, cfg, stages)
    out, loss = _forward(model, batch)
    fast = _grads(model, loss)

    base = model.base_causallm
    args = (batch["input_ids"], batch["attention_mask"])
    ref_coconut, _ = reference_forward(base, *args, batch["labels"], batch["position_ids"], tokens.latent_id)
    ref_step = reference_step_loss(base, _part(model).decoder_of(model), *args, batch["position_ids"],
                                   tokens.latent_id, cfg.c_thought, per_row, tokens.eos_id)
    ref_loss = ref_coconut + 1.0 * ref_step
    torch.testing.assert_close(out.terms["step"], ref_step, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.loss, ref_coconut, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    _assert_same(fast, _grads(model, ref_loss))


def test_step_prompt_matches_the_reference():
    cfg, stages = CASES[1]
    model, tok, tokens = _setup("llama", cfg.c_thought, "copy")
    prompt = "Step {k} of the solution"
    batch, per_row, steps = _batch(tok, tokens, cfg, stages, prompt=prompt)
    out, _ = _forward(model, batch)
    ref = reference_step_loss(model.base_causallm, _part(model).decoder, batch["input_ids"], batch["attention_mask"],
                              batch["position_ids"], tokens.latent_id, cfg.c_thought, per_row, tokens.eos_id,
                              prompt_ids=steps.prompt_ids)
    assert steps.prompt_ids(0) != steps.prompt_ids(1)
    torch.testing.assert_close(out.terms["step"], ref, rtol=RTOL, atol=ATOL)
    _assert_same(_grads(model, out.terms["step"]), _grads(model, ref))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpointing_on_and_off_agree(arch):
    cfg, stages = CASES[1]
    model, tok, tokens = _setup(arch, cfg.c_thought, "copy")
    batch, _, _ = _batch(tok, tokens, cfg, stages)
    _, plain = _forward(model, batch)
    plain_grads = _grads(model, plain)
    enable_latent_safe_checkpointing(model.base_causallm)
    enable_latent_safe_checkpointing(_part(model).decoder)
    _, ckpt = _forward(model, batch)
    torch.testing.assert_close(ckpt, plain, rtol=RTOL, atol=ATOL)
    _assert_same(_grads(model, ckpt), plain_grads)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_on_base_and_decoder_equals_the_reference(arch):
    from coconut_scale.model.lora import apply_lora

    cfg, stages = CASES[0]
    model, tok, tokens = _setup(arch, cfg.c_thought, "copy")
    lora = LoraSpec(rank=4, alpha=8, dropout=0.0)
    apply_lora(model, lora, tok)
    _part(model).decoder = wrap_with_lora(_part(model).decoder, lora)
    with torch.no_grad():  # adapters start at B = 0; move them so their gradients are not trivially related
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    prefix = StepSupervision.name + ".decoder."
    assert any(n.startswith(prefix) and "lora_" in n for n in trainable)
    assert not any(n.startswith(prefix) and "lora_" not in n for n in trainable)
    batch, per_row, _ = _batch(tok, tokens, cfg, stages)
    _, loss = _forward(model, batch)
    base = model.base_causallm
    args = (batch["input_ids"], batch["attention_mask"])
    ref = reference_forward(base, *args, batch["labels"], batch["position_ids"], tokens.latent_id)[0] + \
        reference_step_loss(base, _part(model).decoder, *args, batch["position_ids"], tokens.latent_id,
                            cfg.c_thought, per_row, tokens.eos_id)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    _assert_same(_grads(model, loss), _grads(model, ref))


def test_a_batch_without_latents_still_runs_the_decoder_with_zero_loss():
    cfg = CurriculumConfig(c_thought=1, max_latent_stage=3)
    model, tok, tokens = _setup("gpt2", 1, "copy")
    batch, per_row, _ = _batch(tok, tokens, cfg, [0, 0, 0, 0])
    assert batch["step_targets"].shape[0] == 0 and per_row == [[], [], [], []]
    calls = []
    _part(model).decoder.register_forward_hook(lambda *a: calls.append(1))
    out, loss = _forward(model, batch)
    assert calls == [1] and float(out.terms["step"].detach()) == 0.0
    torch.testing.assert_close(loss, out.loss)
    loss.backward()  # the decoder is in the graph (zero gradient), as ZeRO-3 needs on every rank
    assert all(p.grad is not None for p in _part(model).decoder.parameters())


def test_without_step_tensors_it_is_plain_coconut():
    cfg, stages = CASES[0]
    model, tok, tokens = _setup("llama", 1, "copy")
    batch, _, _ = _batch(tok, tokens, cfg, stages)
    plain = {k: v for k, v in batch.items() if not k.startswith("step_")}
    calls = []
    _part(model).decoder.register_forward_hook(lambda *a: calls.append(1))
    out = model(**plain)
    ref, _ = reference_forward(model.base_causallm, plain["input_ids"], plain["attention_mask"], plain["labels"],
                               plain["position_ids"], tokens.latent_id)
    torch.testing.assert_close(out.loss, ref, rtol=RTOL, atol=ATOL)
    assert out.terms is None and calls == []  # the part did not run


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_steps_reads_back_what_the_decoder_was_trained_on(arch):
    """Teacher-forced argmax equals greedy decoding: fed its own greedy tokens in the loss's layout, the decoder's
    argmax at each target position is the next decoded token, so decode_steps and the loss see the same layout."""
    cfg, stages = CASES[1]
    model, tok, tokens = _setup(arch, cfg.c_thought, "copy")
    part = _part(model)
    batch, _, _ = _batch(tok, tokens, cfg, stages)
    n_new = 6
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if not k.startswith("step_")})
        rows, steps = batch["step_rows"], batch["step_index"]
        decoded = part.decode_steps(model, batch["input_ids"], out.inputs_embeds, rows, steps, tokens.eos_id,
                                    max_new_tokens=n_new)
        assert len(decoded) == rows.shape[0]
        lengths = torch.tensor([len(d) for d in decoded])
        targets = torch.full((len(decoded), n_new + 1), tokens.eos_id)
        for i, d in enumerate(decoded):
            targets[i, :len(d)] = torch.tensor(d, dtype=torch.long)
        thoughts = torch.stack([out.inputs_embeds[r, (batch["input_ids"][r] == tokens.latent_id).nonzero()[
            int(k) * cfg.c_thought:(int(k) + 1) * cfg.c_thought, 0]] for r, k in zip(rows.tolist(), steps.tolist())])
        inputs = decoder_inputs(thoughts, model.base_causallm.get_input_embeddings(), targets, lengths)
        logits = part.decoder(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                              position_ids=inputs.position_ids).logits
    forced = logits[:, inputs.first:inputs.first + n_new + 1].argmax(dim=-1)
    for i, d in enumerate(decoded):
        assert forced[i, :len(d)].tolist() == d, (i, d, forced[i].tolist())
        if len(d) < n_new:  # stopped at EOS: EOS is the argmax after its last token
            assert int(forced[i, len(d)]) == tokens.eos_id


# -- recipe, memory, export, analysis ---------------------------------------------------------------------------
def test_recipe_switch_is_off_by_default_and_refused_without_latents():
    from coconut_scale.config.recipe import RecipeError, load_recipe

    assert not load_recipe("recipes/tiny_cpu.yaml").coconut.step_supervision.enabled
    with pytest.raises(RecipeError, match="coconut.step_supervision.enabled: mode 'no_cot'"):
        load_recipe("recipes/tiny_cpu.yaml", ["coconut.step_supervision.enabled=true", "coconut.mode=no_cot"])
    step = load_recipe("recipes/tiny_cpu.yaml", ["coconut.step_supervision.enabled=true",
                                                 "coconut.step_supervision.stages=[2]"]).coconut.step_supervision
    assert [step.applies_to(s) for s in (0, 1, 2, 3)] == [False, False, True, False]


def test_memory_estimate_counts_the_decoder():
    from coconut_scale.config.memory import estimate_memory, estimate_phases
    from coconut_scale.config.recipe import load_recipe

    recipe = "recipes/llama8b_gsm_lora.yaml"
    plain = estimate_memory(load_recipe(recipe), 8)
    copy = estimate_memory(load_recipe(recipe, ["coconut.step_supervision.enabled=true"]), 8)
    shared = load_recipe(recipe, ["coconut.step_supervision.enabled=true", "coconut.step_supervision.decoder=shared"])
    assert copy["weights"] == pytest.approx(2 * plain["weights"])
    assert estimate_memory(shared, 8)["weights"] == plain["weights"]
    # The decoder's call is one more moment of the step (after the passes, before backward); the step's peak sits
    # in backward, after the decoder's backward has freed what it kept, unless the decoder's call is the larger.
    train = estimate_phases(shared, 8)["train"]
    assert plain["total"] <= estimate_memory(shared, 8)["total"] < copy["total"]
    assert train["total"] >= estimate_phases(load_recipe(recipe), 8)["train"]["total"]


def test_export_without_decoder_then_beside_it_and_decode_latents(tmp_path):
    import json

    from coconut_scale.evaluate.decode_latents import main as decode_main, token_f1
    from coconut_scale.model.export_meta import ExportMeta, StepDecoderMeta
    from coconut_scale.model.loading import load_exported_with_step_decoder, save_exported
    from coconut_scale.train.export import split_decoder_state, write_step_decoder

    model, tok, tokens = _setup("gpt2", 2, "copy")
    own, dec = split_decoder_state(model.state_dict())
    assert dec and not any(k.startswith(StepSupervision.name) for k in own)
    assert dec.keys() == _part(model).decoder.state_dict().keys()
    meta = ExportMeta(c_thought=2, tokens=tokens, stage=3, max_latent_stage=3)
    export = save_exported(model, tok, tmp_path / "export", meta)
    write_step_decoder(model, dec, export, StepDecoderMeta(c_thought=2, weight=1.0, prompt=None, shared=False))
    loaded, _, loaded_meta, step = load_exported_with_step_decoder(export)
    assert loaded_meta == meta and step == StepDecoderMeta(c_thought=2, weight=1.0, prompt=None, shared=False)
    for k, v in _part(model).decoder.state_dict().items():
        torch.testing.assert_close(_part(loaded).decoder.state_dict()[k], v)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    assert decode_main([str(export), str(data), "--max-new-tokens", "4", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "decode_latents.json").read_text())
    assert report["overall"]["n"] == 1 + 2 + 3 + 3  # latent steps of the stage-3 prompts
    assert {"gold", "decoded", "exact", "token_f1"} <= report["rows"][0].keys()
    assert "exact match" in (tmp_path / "out" / "decode_latents.txt").read_text()
    assert token_f1("a b c", "a b c") == 1.0 and token_f1("a b", "c") == 0.0
