"""CODI's rows (data/codi_data.py) as Coconut features plus the CODI part's batch tensors.

A feature is what the Coconut core trains on, in its aligned layout (data/collate.py):

    input_ids = question <bot> <latent> * num_latent <eot> answer <eos>     (encoder ids, latents, decoder ids)
    labels    = -100 up to and including <eot>, then the answer and <eos>   (CODI's labels[:, 1:] after eot)

with bot / eot the Coconut start / end markers. It also keeps the teacher's ids, labels and answer position, and
`student_offset`, the student's answer position counted from the row's first token, and `last_latent_offset`.
`CodiPartCollator` turns a micro-batch of features into the part's inputs (model/codi.py CODI_KEYS): the teacher
batch right-padded (pad, labels -100), its mask, and `student_column` / `last_latent_column`, the offsets moved by
the row's left padding in the core's batch.
"""

from __future__ import annotations

import torch

from coconut_scale.data.codi_data import CodiDataOptions, CodiTokenIds, answer_value, build_codi_rows
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.model.tokens import IGNORE_INDEX, LatentTokens


def codi_token_ids(tokens: LatentTokens) -> CodiTokenIds:
    """bot / eot are the Coconut start / end markers; pad and eos the tokenizer's."""
    return CodiTokenIds(bot_id=tokens.start_id, eot_id=tokens.end_id, pad_id=tokens.pad_id, eos_id=tokens.eos_id)


def codi_data_options(section: dict) -> CodiDataOptions:
    """The data rules of a recipe's `codi` section (or an export's copy of it, with `model_name`)."""
    keys = ("include_last_cot", "remove_eos", "max_token_num", "bos_rule", "lone_space_rule", "model_name",
            "answer_filter", "cot_rule", "answer_rule")
    return CodiDataOptions(**{k: section[k] for k in keys if k in section})


def codi_feature(row: dict, tokens: LatentTokens, num_latent: int) -> dict:
    encoder, decoder = list(row["encoder_input_ids"]), list(row["decoder_input_ids"])
    prefix = encoder + [tokens.latent_id] * num_latent
    return {
        "input_ids": prefix + decoder,
        "labels": [IGNORE_INDEX] * (len(prefix) + 1) + decoder[1:],
        "teacher_input_ids": list(row["teacher_input_ids"]),
        "teacher_labels": list(row["teacher_labels"]),
        "teacher_position": int(row["teacher_answer_position"]),
        "student_offset": len(prefix) + int(row["student_answer_position"]),
        "last_latent_offset": len(prefix) - 1,
        "idx": int(row["index"]),
        "n_latents": num_latent,
    }


def codi_features(records: list[dict], tokenizer, tokens: LatentTokens, num_latent: int,
                  options: CodiDataOptions = CodiDataOptions(), source: str | None = None) -> tuple[list[dict], object]:
    """The features of `records` (validated, filtered as the released code does) and the filter summary."""
    rows, summary = build_codi_rows(records, tokenizer, codi_token_ids(tokens), options, source=source)
    return [codi_feature(r, tokens, num_latent) for r in rows], summary


def codi_eval_examples(records: list[dict], tokenizer, tokens: LatentTokens, num_latent: int,
                       options: CodiDataOptions = CodiDataOptions(), source: str | None = None) -> list[dict]:
    """Generation prompts as their test.py builds them: the encoder ids (question, eos without remove_eos, bot),
    num_latent latents and the decoder's opening ([eot], or [eot, eos] without remove_eos); generation decodes
    the answer from there. Scored on the answer's last word (evaluate/generation.py reads after the last '#',
    so the gold is the bare number; `answer_rule` "last_number" makes the scorer read the prediction as their
    test.py does: the last number of the decoded text; "last_word" reads the last word of prediction and gold,
    for one-word text answers)."""
    rows, _ = build_codi_rows(records, tokenizer, codi_token_ids(tokens), options, source=source)
    opening = 1 if options.remove_eos else 2
    examples = []
    for row in rows:
        record = records[row["index"]]
        prompt = list(row["encoder_input_ids"]) + [tokens.latent_id] * num_latent
        steps = list(record.get("steps", []))
        # The analyses' gold continuation (evaluate/ablations.py): no steps left in text, then the answer + eos
        # exactly as the student is trained on it; the teacher ids, what SIM-CoT's step targets are cut from
        # (data/codi_steps.py, evaluate/decode_latents.py).
        examples.append({"input_ids": prompt + list(row["decoder_input_ids"][:opening]), "n_latents": num_latent,
                         "stage": 0, "idx": int(row["index"]), "answer": answer_value(record["answer"]),
                         "steps": steps, "n_skipped_steps": len(steps), "steps_ids": [[] for _ in steps],
                         "answer_ids": list(row["decoder_input_ids"][opening:]), "answer_rule": options.answer_rule,
                         "teacher_input_ids": list(row["teacher_input_ids"])})
    return examples


def _pad_right(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return out, mask


class CodiPartCollator:
    """The CODI part's tensors for a micro-batch, consistent with `collate`'s layout of the same features."""

    def __init__(self, pad_id: int, collate: LatentAlignedCollator):
        self.pad_id = pad_id
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        teacher, mask = _pad_right([f["teacher_input_ids"] for f in features], self.pad_id)
        labels, _ = _pad_right([f["teacher_labels"] for f in features], IGNORE_INDEX)
        left = self.collate._left_padding(features)
        return {
            "teacher_input_ids": teacher,
            "teacher_attention_mask": mask,
            "teacher_labels": labels,
            "teacher_position": torch.tensor([f["teacher_position"] for f in features], dtype=torch.long),
            "student_column": torch.tensor([lp + f["student_offset"] for lp, f in zip(left, features)],
                                           dtype=torch.long),
            "last_latent_column": torch.tensor([lp + f["last_latent_offset"] for lp, f in zip(left, features)],
                                               dtype=torch.long),
        }
