"""SIM-CoT's step targets on CODI (InternLM/SIM-CoT CODI/src/model.py), cut out of the collated teacher ids and
flattened over (row, step) pairs for the step decoder (model/step_supervision.py, layout "codi").

Per row (`get_steps`, their 147-221): read the teacher ids up to the first eos or pad; every span from a start id
("<<" or " <<") to the next end id (">>") is a step, with eos appended; num_latent + 1 steps per row (one per
latent z_0..z_n): more spans -> the tail is joined into the last step (one eos at its end), fewer -> [pad] steps.
The steps of a batch are padded to the batch's longest (`pad_steps`, 223-246).

`dedup_bug=True` reproduces `dedup_trailing_pads` called inside their per-row loop (248-260, called at 494 / 616):
step k of every row is cut to the length of row 0's step k plus one trailing pad, so a longer step loses its tail
and its eos, and when row 0's step is [pad] every row keeps one token. False gives every row its whole step.

A pair's decoder input is [z_k, embeddings of its ids]; its labels are exactly its ids (pads removed, they are
masked and unlabelled there): `step_targets` holds the ids (eos-padded), `step_lengths` = count - 1, so the
decoder layout's "through the first EOS" covers exactly the ids. A row's all-pad step is no pair (no label).

The start / end ids are the tokenizer's single tokens for "<<", " <<" and ">>" (what their code hard-codes for
Llama-3 and GPT-2); a tokenizer without them is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from coconut_scale.errors import UserError


class CodiStepError(UserError):
    """A tokenizer whose step markers are not single tokens."""


PAD = -1  # the [pad] step and the batch padding of the steps: never a token id (a tokenizer's pad may be its eos)


@dataclass(frozen=True)
class StepIds:
    start_ids: tuple[int, ...]
    end_id: int
    eos_id: int
    stop_ids: tuple[int, ...]  # a teacher row is read up to the first of these (their eos and pad)
    pad_id: int = PAD


def step_ids(tokenizer, eos_id: int, pad_id: int) -> StepIds:
    def single(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    starts = tuple(i for i in (single("<<"), single(" <<")) if i is not None)
    end = single(">>")
    if not starts or end is None:
        raise CodiStepError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} does not encode '<<' or "
                            f"'>>' as single tokens ('<<' -> {tokenizer.encode('<<', add_special_tokens=False)}, "
                            f"'>>' -> {tokenizer.encode('>>', add_special_tokens=False)}): SIM-CoT's CODI steps "
                            f"are cut at those tokens")
    return StepIds(starts, end, eos_id, (eos_id, pad_id))


def get_steps(rows: Sequence[Sequence[int]], num_steps: int, ids: StepIds) -> list[list[list[int]]]:
    out = []
    for row in rows:
        seq = list(row)
        stop = next((k for k, t in enumerate(seq) if t in ids.stop_ids), len(seq))
        seq = seq[:stop]
        spans, i = [], 0
        while i < len(seq):
            if seq[i] in ids.start_ids:
                end = next((j for j in range(i + 1, len(seq)) if seq[j] == ids.end_id), None)
                if end is not None:
                    spans.append(seq[i:end + 1])
                    i = end + 1
                    continue
            i += 1
        if len(spans) > num_steps:
            steps = [s + [ids.eos_id] for s in spans[:num_steps - 1]]
            steps.append([t for s in spans[num_steps - 1:] for t in s] + [ids.eos_id])
        else:
            steps = [s + [ids.eos_id] for s in spans] + [[ids.pad_id]] * (num_steps - len(spans))
        out.append(steps)
    return out


def _row0_length(step: list[int], pad_id: int) -> int:
    """Row 0's step cut to its content plus one trailing pad (their dedup_trailing_pads on row 0 alone)."""
    length = len(step)
    while length > 1 and step[length - 2] == pad_id:
        length -= 1
    return length


def step_pairs(teacher_rows: Sequence[Sequence[int]], num_steps: int, ids: StepIds,
               dedup_bug: bool = True) -> list[tuple[int, int, list[int]]]:
    """(row, step, the ids the decoder reads and is labelled with) for every pair with at least one id."""
    steps = get_steps(teacher_rows, num_steps, ids)
    longest = max(len(s) for row in steps for s in row)
    padded = [[s + [ids.pad_id] * (longest - len(s)) for s in row] for row in steps]
    pairs = []
    for k in range(num_steps):
        cut = _row0_length(padded[0][k], ids.pad_id) if dedup_bug else longest
        for r, row in enumerate(padded):
            kept = [t for t in row[k][:cut] if t != ids.pad_id]
            if kept:
                pairs.append((r, k, kept))
    return pairs


class CodiStepCollator:
    """The step decoder's inputs (model/step_supervision.py STEP_KEYS, layout "codi") for a micro-batch of CODI
    features (data/codi_features.py), the same on every rank for the same features."""

    def __init__(self, ids: StepIds, num_latent: int, dedup_bug: bool = True):
        self.ids, self.num_steps, self.dedup_bug = ids, num_latent + 1, dedup_bug

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pairs = step_pairs([f["teacher_input_ids"] for f in features], self.num_steps, self.ids, self.dedup_bug)
        width = max((len(p[2]) for p in pairs), default=0) + 1
        targets = torch.full((len(pairs), width), self.ids.eos_id, dtype=torch.long)
        for i, (_, _, kept) in enumerate(pairs):
            targets[i, :len(kept)] = torch.as_tensor(kept, dtype=torch.long)
        return {"step_targets": targets,
                "step_lengths": torch.tensor([len(p[2]) - 1 for p in pairs], dtype=torch.long),
                "step_rows": torch.tensor([p[0] for p in pairs], dtype=torch.long),
                "step_index": torch.tensor([p[1] for p in pairs], dtype=torch.long)}
