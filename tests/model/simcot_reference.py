"""A plain, per-row reference of SIM-CoT's step supervision on CODI, for tests only.

InternLM/SIM-CoT CODI/src/model.py: the steps are cut out of the collated teacher ids (get_steps, 147-221), padded
to the batch's longest step (pad_steps, 223-246), and step k is decoded from CODI's latent z_k by a separate
decoder model (488-549 for z_0, 611-668 for z_1..z_n): input [z_k, embeddings of the step's ids] with CODI's
input embedding table, labels the step's ids (the latent slot and pads at -100), one token-mean cross-entropy per
step over the batch; steps with no label in any row are skipped and not counted; explain =
explain_loss_factor * sum of the counted steps' CE / max(1, counted) (734-736), added to CODI's total (744-748).

The step token ids are arguments here (the released code hard-codes Llama-3 and GPT-2 ids, 467-480).

`dedup_trailing_pads=True` reproduces the released bug (248-260, called inside the per-row loop at 494 and 616):
every row of step k is cut to the length of row 0's step k plus one trailing pad, so a longer step loses its
tail and its eos, and when row 0's step is [pad] every row keeps only its first token. False gives each row
its whole step, which is what pad_steps prepared.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def get_steps(teacher_rows: Sequence[Sequence[int]], num_steps: int, start_ids: Sequence[int], end_id: int,
              step_end_id: int, pad_id: int, stop_ids: Sequence[int]) -> list[list[list[int]]]:
    """Per row, `num_steps` steps: each span from a start id to the next end id, with step_end_id (eos) appended.

    A row is read up to its first stop id (eos or pad). A start id whose end is not reached before a stop id
    opens no step. More spans than num_steps: the first num_steps-1 are kept and the rest joined into the last
    step (their ids concatenated, one step_end_id at the end); fewer: [pad_id] steps fill up.
    """
    result = []
    for row in teacher_rows:
        seq = list(row)
        for k, token in enumerate(seq):
            if token in stop_ids:
                seq = seq[:k]
                break
        spans, i = [], 0
        while i < len(seq):
            if seq[i] in start_ids:
                end = next((j for j in range(i + 1, len(seq)) if seq[j] == end_id), None)
                if end is not None:
                    spans.append(seq[i:end + 1])
                    i = end + 1
                    continue
            i += 1
        if len(spans) > num_steps:
            steps = [s + [step_end_id] for s in spans[:num_steps - 1]]
            steps.append([t for s in spans[num_steps - 1:] for t in s] + [step_end_id])
        else:
            steps = [s + [step_end_id] for s in spans] + [[pad_id]] * (num_steps - len(spans))
        result.append(steps)
    return result


def pad_steps(steps: list[list[list[int]]], pad_id: int) -> list[list[list[int]]]:
    """Every step of every row right-padded to the longest step of the batch."""
    longest = max(len(step) for row in steps for step in row)
    return [[step + [pad_id] * (longest - len(step)) for step in row] for row in steps]


def dedup_trailing_pads(rows: list[list[int]], pad_id: int) -> list[list[int]]:
    """Every row cut to row 0's length, then one column less while the second-to-last is pad in every row
    (so exactly one trailing all-pad column stays)."""
    if not rows:
        return []
    length = len(rows[0])
    while length > 1 and all(row[length - 2] == pad_id for row in rows):
        length -= 1
    return [row[:length] for row in rows]


def step_ids_per_row(padded_steps: list[list[list[int]]], k: int, pad_id: int, dedup_bug: bool) -> list[list[int]]:
    """Each row's real ids of step k as the decoder sees them (pads, which get mask 0 and label -100, removed)."""
    rows = [row[k] for row in padded_steps]
    if dedup_bug:
        rows = [row[:len(dedup_trailing_pads(rows[:1], pad_id)[0])] for row in rows]
    return [[t for t in row if t != pad_id] for row in rows]


def step_decoder_loss(decoder, codi_embedding, latents: list[list[torch.Tensor]], padded_steps: list[list[list[int]]],
                      pad_id: int, dedup_bug: bool = True, explain_loss_factor: float = 1.0):
    """Returns (explain, per-step CE or None when skipped); latents[r][k] is row r's z_k, [1, 1, H]."""
    step_ces = []
    for k in range(len(latents[0])):
        ce_sum, count = 0.0, 0
        for r, ids in enumerate(step_ids_per_row(padded_steps, k, pad_id, dedup_bug)):
            if not ids:
                continue
            tokens = torch.tensor(ids, device=latents[r][k].device)
            embeds = torch.cat([latents[r][k], codi_embedding(tokens)[None]], dim=1)
            logits = decoder(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1], device=embeds.device)[None]).logits[0]
            # Position t predicts ids[t]: the latent predicts the first step token, the last one predicts eos.
            ce_sum = ce_sum + F.cross_entropy(logits[:-1].float(), tokens, reduction="sum")
            count += len(ids)
        step_ces.append(ce_sum / count if count else None)
    counted = [ce for ce in step_ces if ce is not None]
    explain = explain_loss_factor * (sum(counted) / max(1, len(counted)) if counted else torch.tensor(0.0))
    return explain, step_ces
