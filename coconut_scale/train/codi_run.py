"""A `method: codi` run's data: the training and validation features (data/codi_features.py), the generation
prompts and the part's collator, from the recipe's data files and `codi` section.

CODI has no curriculum: every epoch trains the same features, each with `num_latent` thoughts, so the trainer
runs stage 0 throughout and a fixed `num_latent + 1` base-model passes per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from coconut_scale.data.codi_data import CodiDataOptions, CodiDataError
from coconut_scale.data.codi_features import CodiPartCollator, codi_data_options, codi_eval_examples, codi_features
from coconut_scale.data.codi_steps import CodiStepCollator, step_ids
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.data.records import load_records
from coconut_scale.model.codi import CodiPart
from coconut_scale.model.export_meta import ExportMeta
from coconut_scale.model.tokens import LatentTokens


def codi_options(recipe) -> CodiDataOptions:
    return codi_data_options({**recipe.codi.model_dump(), "model_name": recipe.model.name_or_path})


@dataclass
class CodiData:
    train: list[dict]
    val: list[dict]
    eval_examples: list[dict]
    collate: CodiPartCollator
    passes: int  # base-model calls per batch (see load_codi_data)
    summary: str


def load_codi_data(recipe, tokenizer, tokens: LatentTokens, collate: LatentAlignedCollator) -> CodiData:
    """Features of the train and validation files, the validation file's generation prompts; refuses a file of
    which nothing is left after CODI's filters (one line naming it and the counts)."""
    options, n = codi_options(recipe), recipe.codi.num_latent
    sets, lines = {}, []
    for role, path in (("train", recipe.data.train_file), ("validation", recipe.data.val_file)):
        records = load_records(path)
        features, summary = codi_features(records, tokenizer, tokens, n, options, source=str(path))
        # data.max_seq_len bounds both sequences of a row (the memory estimate and the batch plan assume it).
        limit = recipe.data.max_seq_len
        kept = [f for f in features if max(len(f["input_ids"]), len(f["teacher_input_ids"])) <= limit]
        too_long, features = len(features) - len(kept), kept
        if not features:
            raise CodiDataError(path, None, "answer", f"no {role} record is left after CODI's filters: "
                                f"{len(summary.dropped_too_long)} longer than codi.max_token_num "
                                f"{options.max_token_num}, {len(summary.dropped_non_digit_answer)} with an answer "
                                f"that does not start with a digit (codi.answer_filter none keeps them), {too_long} "
                                f"longer than data.max_seq_len {limit}, of {len(records)}")
        sets[role] = (records, features)
        lines.append(f"{len(features)} {role} ({len(summary.dropped_too_long)} dropped > codi.max_token_num, "
                     f"{len(summary.dropped_non_digit_answer)} non-digit answers, {too_long} > data.max_seq_len)")
    val_records = sets["validation"][0]
    if recipe.data.eval_max_examples:
        val_records = val_records[: recipe.data.eval_max_examples]
    examples = codi_eval_examples(val_records, tokenizer, tokens, n, options, source=str(recipe.data.val_file))
    # The plan: the prefix up to the first latent, then one pass per latent column (the last one runs on to the
    # end: eot and the answer), i.e. num_latent + 1 calls, the same for every batch and rank.
    return CodiData(train=sets["train"][1], val=sets["validation"][1], eval_examples=examples,
                    collate=CodiPartCollator(tokens.pad_id, collate), passes=n + 1,
                    summary="data (codi): " + ", ".join(lines))


PART_NAME = CodiPart.name


def codi_step_collator(recipe, tokenizer, tokens: LatentTokens) -> CodiStepCollator:
    """SIM-CoT's CODI step targets (data/codi_steps.py), from the tokenizer's "<<" / " <<" / ">>" tokens."""
    ids = step_ids(tokenizer, tokens.eos_id, tokens.pad_id)
    return CodiStepCollator(ids, recipe.codi.num_latent, recipe.codi.step_dedup_bug)


def codi_export_meta(recipe, tokens: LatentTokens, metrics: dict) -> ExportMeta:
    """An export's coconut_config.json for method codi: one latent per "step", num_latent of them (the
    evaluation layout), and the whole codi section with the model name the lone-space rule reads."""
    n = recipe.codi.num_latent
    return ExportMeta(c_thought=1, tokens=tokens, stage=n, mode="coconut", max_latent_stage=n,
                      pad_latent_to_max=True, metrics=metrics, method="codi",
                      codi={**recipe.codi.model_dump(mode="json"), "model_name": recipe.model.name_or_path})
