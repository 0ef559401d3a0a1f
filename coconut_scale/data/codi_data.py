"""CODI's training rows, built from question/steps/answer records for any Hugging Face tokenizer.

This is the data layout of the released CODI code (zhenyi4/codi train.py:157-362, icot branch train.py:263-287),
for the project's records (coconut_scale/data/records.py) instead of their dataset rows:

    question      = record["question"], verbatim
    CoT text      = " ".join(record["steps"]) split on single spaces, the last piece dropped
                    (all of it with include_last_cot)
    answer text   = "The answer is: " + <last space-separated word of record["answer"]>, "####" removed

Each of the three texts is tokenized separately, with the tokenizer's own special tokens (a Llama-3 BOS on
each) and truncated to 256 tokens, then (ids, per row):

    teacher_input_ids  = question + CoT + answer + [eos]             (their ref_input_ids)
    teacher_labels     = teacher_input_ids with the question at -100  (their ref_labels)
    encoder_input_ids  = question + [bot]
    decoder_input_ids  = [eot] + answer + [eos]                      ([eot, eos] + ... without remove_eos)
    labels             = decoder_input_ids
    teacher_answer_position, student_answer_position: see below      (their ref_/model_answer_position)

Without `remove_eos`, eos is also appended to the question and the CoT pieces (train.py:180-183).

**Answer positions.** Both positions are the index of the token whose output predicts the first token of the
answer value, i.e. the distillation position of src/model.py:356-358 after its adjustments (model.py:306-308,
327-328), which the released code applies in the forward pass and this module applies here:
  1. find the only occurrence of the ids of "The answer is:" (the tokenizer's BOS removed) in the teacher /
     decoder ids (train.py:157-164, 204-210); p = the index right after it;
  2. the lone-space rule: p += 1 when the token at p stands for the space before the number (Llama-3 and Qwen
     split ": 12" into ":", " ", "12"). `lone_space_rule="model_name"` decides it as the released code does, by
     "llama" or "qwen" in the model name (model.py:306); `"token"` decides it per row from the token itself
     (it decodes to whitespace only), which also covers a Llama-architecture model named otherwise;
  3. p -= 1.
So for GPT-2 the position holds ":" (predicting " 12"), for Llama-3 the lone " " (predicting "12").

**BOS stripping.** The released code strips the first token of every CoT and answer piece when the first token
of the first kept record's CoT piece is the tokenizer's BOS (train.py:185-187), after eos was appended; it
decides for all rows from that one row. `bos_rule="record0"` reproduces that (an empty first CoT, where their
code raises IndexError, counts as "not BOS"); `bos_rule="per_row"` strips each CoT and answer piece's first
token only when the tokenizer put a BOS there, which is the intent: a GPT-2 CoT that is empty without
remove_eos is [eos] == [bos] and the record-0 rule would then cut the first token of every answer.

**Special ids.** bot, eot and pad are given by the caller. The released code puts them right after the base
vocabulary: pad = V, bot = V+1, eot = V+2 for the model's original vocab_size V, resizing the embeddings to V+3
(src/model.py:169-179); nothing here depends on that layout.

Filters (train.py:263-281), applied in this order: a record whose tokenized question + full CoT text + answer,
concatenated without separator (len(tokenizer.encode(...)), so with BOS), has more than `max_token_num` tokens
is dropped; so is one whose answer value does not start with a digit (negative answers).

**Text answers and sentence steps** (ProsQA-style records), switches whose defaults are the released rules:
`answer_filter="none"` keeps records whose answer value is not a number (the released "digit" filter drops every
"Tom is a wumpus."); `cot_rule="steps"` drops the last *step* instead of the last space-separated piece (the same
for iCoT steps, which hold no space; the released rule cuts a sentence step "Every X is a Y." to "Every X is a");
`answer_rule="last_word"` (evaluation, data/codi_features.py) scores the last word of the generated text, trailing
punctuation removed, against the answer value's, instead of the last number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

import torch

from coconut_scale.data.records import DataFormatError, validate_record
from coconut_scale.model.tokens import IGNORE_INDEX

ANSWER_PROMPT = "The answer is:"
PIECE_MAX_TOKENS = 256  # train.py:71, each of question / CoT / answer
_RELEASED_LONE_SPACE_NAMES = ("llama", "qwen")


class CodiDataError(DataFormatError):
    """A record CODI's layout cannot be built from; the message names the record index and the field."""


@dataclass(frozen=True)
class CodiTokenIds:
    """The ids CODI adds (bot, eot: embedding rows only, not tokenizer tokens; pad) and the tokenizer's eos."""

    bot_id: int
    eot_id: int
    pad_id: int
    eos_id: int


@dataclass(frozen=True)
class CodiDataOptions:
    """The released settings by default (`remove_eos`: both GSM8k-Aug scripts pass it)."""

    include_last_cot: bool = False
    remove_eos: bool = True
    max_token_num: int = 1000  # the Llama-1B script passes 200
    bos_rule: Literal["record0", "per_row"] = "record0"
    lone_space_rule: Literal["model_name", "token"] = "model_name"
    model_name: str = ""  # what the released code reads the lone-space rule from
    answer_filter: Literal["digit", "none"] = "digit"
    cot_rule: Literal["space_split", "steps"] = "space_split"
    answer_rule: Literal["last_number", "last_word"] = "last_number"  # evaluation only (data/codi_features.py)

    def __post_init__(self):
        for name, allowed in (("bos_rule", ("record0", "per_row")), ("lone_space_rule", ("model_name", "token")),
                              ("answer_filter", ("digit", "none")), ("cot_rule", ("space_split", "steps")),
                              ("answer_rule", ("last_number", "last_word"))):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be {' or '.join(repr(a) for a in allowed)}, got {value!r}")


@dataclass
class CodiDataSummary:
    kept: int = 0
    dropped_too_long: list[int] = field(default_factory=list)  # record indices
    dropped_non_digit_answer: list[int] = field(default_factory=list)


def answer_value(answer: str) -> str:
    """The answer's last space-separated word (train.py:277): "#### 18" -> "18"."""
    return answer.split(" ")[-1]


def answer_text(answer: str) -> str:
    return f"The answer is: {answer_value(answer)}".replace("####", "")


def cot_text(steps: Sequence[str], include_last_cot: bool, rule: str = "space_split") -> str:
    """The teacher's CoT text. "space_split": the released code's CoT string (the steps joined by spaces) split on
    single spaces, its last piece dropped (train.py:270-272); for iCoT records, whose steps hold no space
    (coconut_scale/data/converters/gsm_icot.py), that is exactly dropping the last step. "steps": the steps but the
    last, joined by spaces."""
    text = " ".join(steps)
    if include_last_cot:
        return text
    if rule == "steps":
        return " ".join(list(steps)[:-1])
    return " ".join(text.split(" ")[:-1])


def _pieces(tokenizer, texts: list[str]) -> list[list[int]]:
    # One text per call in the released code (train.py:66-76); a batched call gives the same ids.
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, max_length=PIECE_MAX_TOKENS, truncation=True)["input_ids"]]


def answer_prompt_ids(tokenizer) -> list[int]:
    ids = list(tokenizer.encode(ANSWER_PROMPT))
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"the tokenizer encodes {ANSWER_PROMPT!r} to nothing")
    return ids


def _matches(ids: list[int], pattern: list[int]) -> list[int]:
    n = len(pattern)
    return [i for i in range(len(ids) - n + 1) if ids[i:i + n] == pattern]


def _has_lone_space(tokenizer, token_id: int) -> bool:
    text = tokenizer.decode([token_id])
    return text != "" and text.strip() == ""


def _answer_position(ids: list[int], prompt: list[int], tokenizer, options: CodiDataOptions, index: int,
                     sequence: str, field_of: Callable[[int], str]) -> int:
    found = _matches(ids, prompt)
    if len(found) != 1:
        if not found:
            raise CodiDataError(None, index, "answer", f"the {sequence} ids do not contain the ids of "
                                f"{ANSWER_PROMPT!r} ({prompt}): the tokenizer merged it with a neighbour, or the "
                                f"BOS rule cut its first token")
        raise CodiDataError(None, index, field_of(found[0]), f"{ANSWER_PROMPT!r} occurs {len(found)} times in the "
                            f"{sequence} ids (at tokens {found}); CODI needs exactly one, in the answer")
    position = found[0] + len(prompt)
    if options.lone_space_rule == "model_name":
        skip_space = any(name in options.model_name.lower() for name in _RELEASED_LONE_SPACE_NAMES)
    else:
        skip_space = position < len(ids) and _has_lone_space(tokenizer, ids[position])
    position += int(skip_space) - 1
    if position + 1 >= len(ids):
        raise CodiDataError(None, index, "answer", f"no answer token follows {ANSWER_PROMPT!r} in the {sequence} "
                            f"ids")
    return position


def _strip_first_token(cot_ids: list[list[int]], answer_ids: list[list[int]], bos_id: int | None, eos_id: int,
                       options: CodiDataOptions) -> tuple[list[bool], list[bool]]:
    """Per row: drop the first token of the CoT piece? of the answer piece? (pieces as tokenized, before eos)."""
    rows = len(cot_ids)
    if bos_id is None or rows == 0:
        return [False] * rows, [False] * rows
    if options.bos_rule == "per_row":
        return [bool(c) and c[0] == bos_id for c in cot_ids], [bool(a) and a[0] == bos_id for a in answer_ids]
    # Released: row 0's CoT piece as it is at that point, i.e. with eos appended unless remove_eos.
    first_cot = cot_ids[0] + ([] if options.remove_eos else [eos_id])
    strip = bool(first_cot) and first_cot[0] == bos_id
    return [strip] * rows, [strip] * rows


def build_codi_rows(records: Iterable[dict], tokenizer, ids: CodiTokenIds, options: CodiDataOptions = CodiDataOptions(),
                    source: str | None = None) -> tuple[list[dict], CodiDataSummary]:
    """CODI's rows for `records` (validated here: a malformed one raises DataFormatError naming it).

    Each row is a dict: index (the record's position in `records`), encoder_input_ids, decoder_input_ids,
    labels, teacher_input_ids, teacher_labels (lists of ints), teacher_answer_position and
    student_answer_position (ints). Also returns what the filters dropped.
    """
    summary = CodiDataSummary()
    kept: list[tuple[int, dict]] = []
    records = [validate_record(rec, source, i) for i, rec in enumerate(records)]
    full_texts = [r["question"] + " ".join(r["steps"]) + r["answer"] for r in records]
    lengths = [len(x) for x in tokenizer(full_texts)["input_ids"]] if records else []
    for i, (rec, n_tokens) in enumerate(zip(records, lengths)):
        if n_tokens > options.max_token_num:
            summary.dropped_too_long.append(i)
        elif options.answer_filter == "digit" and not answer_value(rec["answer"])[:1].isdigit():
            summary.dropped_non_digit_answer.append(i)
        else:
            kept.append((i, rec))
    summary.kept = len(kept)

    question_ids = _pieces(tokenizer, [rec["question"] for _, rec in kept])
    cot_ids = _pieces(tokenizer, [cot_text(rec["steps"], options.include_last_cot, options.cot_rule)
                                  for _, rec in kept])
    answer_ids = _pieces(tokenizer, [answer_text(rec["answer"]) for _, rec in kept])
    strip_cot, strip_answer = _strip_first_token(cot_ids, answer_ids, tokenizer.bos_token_id, ids.eos_id, options)
    prompt = answer_prompt_ids(tokenizer)
    tail = [] if options.remove_eos else [ids.eos_id]
    rows = []
    for r, (index, _) in enumerate(kept):
        question = question_ids[r] + tail
        cot = (cot_ids[r] + tail)[int(strip_cot[r]):]
        answer = (answer_ids[r] + [ids.eos_id])[int(strip_answer[r]):]
        teacher = question + cot + answer
        decoder = [ids.eot_id] + tail + answer

        def teacher_field(at: int, q=len(question), c=len(cot)) -> str:
            return "question" if at < q else "steps" if at < q + c else "answer"

        rows.append({
            "index": index,
            "encoder_input_ids": question + [ids.bot_id],
            "decoder_input_ids": decoder,
            "labels": list(decoder),
            "teacher_input_ids": teacher,
            "teacher_labels": [IGNORE_INDEX] * len(question) + cot + answer,
            "teacher_answer_position": _answer_position(teacher, prompt, tokenizer, options, index, "teacher",
                                                        teacher_field),
            "student_answer_position": _answer_position(decoder, prompt, tokenizer, options, index, "decoder",
                                                        lambda at: "answer"),
        })
    return rows, summary


def _pad(rows: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded to one width with `value` (on the left or the right), and the mask of the real tokens."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[i, span] = torch.as_tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


class CodiCollator:
    """Batches CODI rows as their collator does (train.py:337-362).

    encoder_input_ids are LEFT-padded with pad, so that every row's bot is in the last column, where the
    question pass reads the first latent; teacher and decoder ids are right-padded with pad, labels and
    teacher_labels with -100. encoder_attention_mask / teacher_attention_mask mark the real tokens; the
    released code computes them as `ids != pad`, which is the same as long as pad is an id of its own (their
    [PAD] = V) that no row contains. There is no decoder mask: the released answer pass runs without one.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("empty batch")
        encoder, encoder_mask = _pad([r["encoder_input_ids"] for r in rows], self.pad_id, left=True)
        teacher, teacher_mask = _pad([r["teacher_input_ids"] for r in rows], self.pad_id)
        decoder, _ = _pad([r["decoder_input_ids"] for r in rows], self.pad_id)
        labels, _ = _pad([r["labels"] for r in rows], IGNORE_INDEX)
        teacher_labels, _ = _pad([r["teacher_labels"] for r in rows], IGNORE_INDEX)
        return {
            "encoder_input_ids": encoder,
            "encoder_attention_mask": encoder_mask,
            "decoder_input_ids": decoder,
            "labels": labels,
            "teacher_input_ids": teacher,
            "teacher_attention_mask": teacher_mask,
            "teacher_labels": teacher_labels,
            "teacher_answer_position": torch.tensor([r["teacher_answer_position"] for r in rows], dtype=torch.long),
            "student_answer_position": torch.tensor([r["student_answer_position"] for r in rows], dtype=torch.long),
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        }
