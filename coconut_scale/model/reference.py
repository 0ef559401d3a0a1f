"""A plain reference implementation of Coconut, for tests and benchmarks only.

Deliberately naive, so that it is obviously right: no KV cache, the whole sequence recomputed on every
pass, each row's k-th latent filled one at a time in Python. Because attention is causal, recomputing the
whole sequence gives the same hidden state at position p-1 as recomputing only the prefix up to p.
"""

from __future__ import annotations

import torch

from coconut_scale.model.coconut import default_position_ids, shifted_cross_entropy


def reference_filled_embeddings(base, input_ids, attention_mask, position_ids, latent_id: int) -> torch.Tensor:
    embeds = base.get_input_embeddings()(input_ids)
    batch, seq_len = input_ids.shape
    latent_lists = [[j for j in range(seq_len) if int(input_ids[i, j]) == latent_id] for i in range(batch)]
    max_latents = max((len(lst) for lst in latent_lists), default=0)
    for k in range(max_latents):
        hidden = base(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True
        ).hidden_states[-1]
        rows = []
        for i in range(batch):
            row = list(embeds[i].unbind(0))
            if len(latent_lists[i]) > k:
                pos = latent_lists[i][k]
                row[pos] = hidden[i, pos - 1]
            rows.append(torch.stack(row))
        embeds = torch.stack(rows)
    return embeds


def reference_forward(base, input_ids, attention_mask=None, labels=None, position_ids=None, latent_id: int = -1):
    """Returns (loss, logits)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    embeds = reference_filled_embeddings(base, input_ids, attention_mask, position_ids, latent_id)
    logits = base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).logits
    loss = shifted_cross_entropy(logits, labels) if labels is not None else None
    return loss, logits


@torch.no_grad()
def reference_generate(base, input_ids, latent_id: int, eos_id: int, max_new_tokens: int = 16) -> torch.Tensor:
    """The official generate: batch 1, latents filled once, then the whole sequence recomputed per new token."""
    if input_ids.shape[0] != 1:
        raise ValueError("reference_generate takes one row at a time, like the official implementation")
    mask = torch.ones_like(input_ids)
    positions = default_position_ids(mask)
    embeds = reference_filled_embeddings(base, input_ids, mask, positions, latent_id)
    tokens = input_ids[0].tolist()
    embed = base.get_input_embeddings()
    for _ in range(max_new_tokens):
        logits = base(inputs_embeds=embeds).logits
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if token == eos_id:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([[token]], device=input_ids.device))], dim=1)
    return torch.tensor([tokens], device=input_ids.device)
