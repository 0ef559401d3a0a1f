"""Batching Coconut examples.

Training/validation batches use the official "maximize KV reuse" layout: every row that contains a latent is
left-padded so that its first latent sits in the same column, then all rows are right-padded to one length:

    xxxxxxxxxx<latent><latent>xxxxx--
    -----xxxxx<latent>xxxxxxxx-------
    ---xxxxxxx<latent><latent>xxxxxxx

Coconut runs the model up to the first latent column for all rows at once, then one column per latent pass,
reusing the KV cache of everything before; aligned latents make each pass one column for every row. Rows
without a latent are not shifted (right padding only). Padding gets attention 0, label -100 and position id 0;
the real tokens of each row have position ids 0..n-1 regardless of their left padding, so padding never
changes what a row computes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from coconut_scale.model.tokens import IGNORE_INDEX



def _first(ids: Sequence[int], value: int) -> int | None:
    for i, t in enumerate(ids):
        if t == value:
            return i
    return None


class LatentAlignedCollator:
    """Collate dicts with "input_ids" (and optionally "labels") into the aligned layout above.

    Returns LongTensors input_ids, attention_mask, position_ids, and labels when the rows have them. Keys named
    in `keep_keys` (per-row ints such as "idx" or "n_latents") come along as 1-D LongTensors; by default none,
    so the batch can go straight into model(**batch).
    """

    def __init__(self, pad_id: int, latent_id: int, label_pad_id: int = IGNORE_INDEX,
                 keep_keys: Sequence[str] = ()):
        self.pad_id = pad_id
        self.latent_id = latent_id
        self.label_pad_id = label_pad_id
        self.keep_keys = tuple(keep_keys)

    def _left_padding(self, features: list[dict]) -> list[int]:
        """Per row: the left padding that puts its first latent in the batch's latent column (0 without latents)."""
        firsts = [_first(f["input_ids"], self.latent_id) for f in features]
        align = max((i for i in firsts if i is not None), default=None)
        return [0 if i is None else align - i for i in firsts]

    def latent_columns(self, features: list[dict]) -> list[int]:
        """The sorted columns of the collated batch that hold a latent in some row, from the features alone:
        the pass plan's input, known on the host without reading the batch back (Coconut's `latent_columns=`)."""
        return sorted({lp + i for lp, f in zip(self._left_padding(features), features)
                       for i, t in enumerate(f["input_ids"]) if t == self.latent_id})

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        has_labels = [f.get("labels") is not None for f in features]
        if any(has_labels) and not all(has_labels):
            raise ValueError("some rows have labels and some do not")
        left = self._left_padding(features)
        width = max(lp + len(f["input_ids"]) for lp, f in zip(left, features))

        n = len(features)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), self.label_pad_id, dtype=torch.long) if has_labels[0] else None
        for r, (lp, f) in enumerate(zip(left, features)):
            ids = f["input_ids"]
            length = len(ids)
            if labels is not None and len(f["labels"]) != length:
                raise ValueError(f"row {r}: {len(f['labels'])} labels for {length} input ids")
            input_ids[r, lp:lp + length] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[r, lp:lp + length] = 1
            position_ids[r, lp:lp + length] = torch.arange(length)
            if labels is not None:
                labels[r, lp:lp + length] = torch.as_tensor(f["labels"], dtype=torch.long)

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if labels is not None:
            batch["labels"] = labels
        for key in self.keep_keys:
            batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        return batch


def left_pad_for_generation(rows: list[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts so that they all END in the last column (where generation appends).

    Returns input_ids, attention_mask, position_ids (0..n-1 over each row's real tokens, 0 on padding), the
    position ids a continuation must carry on from, per row, at attention_mask.sum(1).
    """
    if not rows:
        raise ValueError("empty batch")
    width = max(len(r) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row)
        if length == 0:
            raise ValueError(f"row {i} is empty")
        input_ids[i, width - length:] = torch.as_tensor(list(row), dtype=torch.long)
        attention_mask[i, width - length:] = 1
        position_ids[i, width - length:] = torch.arange(length)
    return input_ids, attention_mask, position_ids
