"""A tiny exported Coconut model and a data file whose expected scores are known by hand.

The expected outputs come from the naive reference (coconut_scale.model.reference: batch of one, no KV cache,
latents filled one at a time by recomputing the whole sequence), not from the batched, cached generate() the
tools use. Some gold answers (and one gold CoT step) are planted from those reference outputs, so the accuracy is
a known fraction strictly between 0 and 1, and the token counts are counted from the reference ids.
"""

from pathlib import Path
from types import SimpleNamespace

import torch

from coconut_scale.data.curriculum import CurriculumConfig, build_eval_examples
from coconut_scale.data.prosqa_synthetic import generate
from coconut_scale.data.records import write_records
from coconut_scale.data.tokenized import tokenize_records
from coconut_scale.evaluate.generation import extract_answer, extract_cot
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.loading import build_coconut, save_exported
from coconut_scale.model.reference import reference_generate
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import tiny_model

MAX_NEW = 12
N_RECORDS = 8
STAGE = 2  # the export's stage and max_latent_stage; pad_latent_to_max is off, so 1-step records get 1 latent
N_PLANTED = 4  # records whose gold answer is set to what the model generates at STAGE


def curriculum() -> CurriculumConfig:
    return CurriculumConfig(mode="coconut", c_thought=1, max_latent_stage=STAGE, pad_latent_to_max=False)


def reference_rows(base, tokenizer, records: list[dict], stage: int, max_new: int = MAX_NEW) -> list[dict]:
    """Per example: prompt latents, the generated ids (up to and including EOS) and their text, by the naive path."""
    tokens = LatentTokens.from_tokenizer(tokenizer)
    rows = []
    for ex in build_eval_examples(tokenize_records(records, tokenizer), stage, curriculum(), tokens):
        ids = torch.tensor([ex["input_ids"]])
        new = reference_generate(base, ids, tokens.latent_id, tokens.eos_id, max_new)[0, ids.shape[1]:].tolist()
        rows.append({"n_latents": ex["input_ids"].count(tokens.latent_id), "ids": new,
                     "text": tokenizer.decode(new, skip_special_tokens=True)})
    return rows


def expected_scores(records: list[dict], refs: list[dict], stage: int) -> list[dict]:
    """Scoring by hand: the answer after the last '#', the CoT before the first '#', gold steps after the stage's."""
    out = []
    for rec, ref in zip(records, refs):
        skip = min(stage, len(rec["steps"]))
        gold_cot = "\n".join(s.strip() for s in rec["steps"][skip:]).strip()
        out.append({"correct": extract_answer(ref["text"]) == rec["answer"].replace(",", "").strip(),
                    "cot_match": extract_cot(ref["text"]) == gold_cot,
                    "n_new_tokens": len(ref["ids"]), "n_latents": ref["n_latents"]})
    return out


def build_tiny_export(root: Path) -> SimpleNamespace:
    """A tiny random Llama exported at stage 2, and a ProsQA-style file whose planted answers it gets right."""
    base, tokenizer = tiny_model("llama", seed=0)
    with torch.no_grad():
        # Untie the three new token rows (exact logit ties make greedy argmax depend on rounding).
        emb = base.get_input_embeddings().weight
        emb.add_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        # At init scale (std 0.02) attention is near uniform and one latent barely moves the output; larger
        # layer weights make the continuous thoughts matter, so feedback on/off and noise change answers.
        for name, weight in base.model.layers.named_parameters():
            if name.endswith("proj.weight"):
                weight.mul_(8.0)
        # An EOS row along a random direction: EOS wins on some states only, so generations stop at varied lengths.
        direction = torch.randn(base.config.hidden_size, generator=torch.Generator().manual_seed(2))
        base.lm_head.weight[tokenizer.eos_token_id] = 0.2 * direction / direction.norm()
    base.eval()
    meta = ExportMeta(c_thought=1, tokens=LatentTokens.from_tokenizer(tokenizer), stage=STAGE, max_latent_stage=STAGE)
    export = save_exported(build_coconut(base, tokenizer), tokenizer, root / "hf" / "stage2", meta)
    records = generate(N_RECORDS, seed=5, n_concepts=5, min_depth=1, max_depth=3, extra_edges=0.3)
    refs = reference_rows(base, tokenizer, records, STAGE)
    # The first records whose generated answer is non-empty (a record needs an answer) get it as their gold.
    planted = [i for i, ref in enumerate(refs) if extract_answer(ref["text"])][:N_PLANTED]
    assert len(planted) == N_PLANTED
    for i in planted:
        records[i]["answer"] = extract_answer(refs[i]["text"])
        if len(records[i]["steps"]) > STAGE:  # the step the stage still writes out: plant the generated CoT
            records[i]["steps"][STAGE] = extract_cot(refs[i]["text"])
    data = root / "prosqa_tiny.json"
    write_records(records, data)
    return SimpleNamespace(export=export, data=data, records=records, base=base, tokenizer=tokenizer, refs=refs,
                           planted=planted)
