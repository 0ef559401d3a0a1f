"""The released CODI training forward, batched as they wrote it, for cross-checking the per-row reference.

A line-by-line transcription of zhenyi4/codi src/model.py:276-400 (and of SIM-CoT's step loss, InternLM/SIM-CoT
CODI/src/model.py:488-548 and 611-668), changed only where transformers 5 forces it: a DynamicCache instead of
the returned tuple cache, and the `cache` keyword. Like the released calls it passes no position ids, so it
relies on Hugging Face's default (the cache position, as in transformers 4.52), while the per-row reference
passes them explicitly: the two agreeing also pins that default. Gathers, flattened cross-entropies and the
per-step masks are theirs. Tests compare it with codi_reference / simcot_reference, which compute the same
numbers row by row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from codi_reference import IGNORE_INDEX, CodiSettings, _cache_kwarg
from simcot_reference import dedup_trailing_pads


def released_codi_forward(model, prj, batch: dict, settings: CodiSettings, keep_latents: bool = False):
    """Returns (total, student_ce, distill (unweighted), teacher_ce (unweighted)[, latents z_0..z_n])."""
    enc, enc_mask = batch["encoder_input_ids"], batch["encoder_attention_mask"]
    ref_ids, dec, labels = batch["teacher_input_ids"], batch["decoder_input_ids"], batch["labels"]
    ref_mask = batch["teacher_attention_mask"] if settings.fix_attn_mask else None
    ref_pos, model_pos = batch["teacher_answer_position"], batch["student_answer_position"]
    B, device, n = enc.shape[0], enc.device, settings.num_latent
    key = _cache_kwarg(model)

    cache = DynamicCache(config=model.config)
    outputs = model(input_ids=enc, attention_mask=enc_mask, use_cache=True, output_hidden_states=True, **{key: cache})
    latent = prj(outputs.hidden_states[-1][:, -1, :].unsqueeze(1))
    latents = [latent]
    with torch.no_grad():
        ref_outputs = model(input_ids=ref_ids, attention_mask=ref_mask, output_hidden_states=True)
    ref_outputs_with_grad = model(input_ids=ref_ids, attention_mask=ref_mask, output_hidden_states=True)
    for i in range(n):
        outputs = model(inputs_embeds=latent, use_cache=True, output_hidden_states=True, **{key: cache})
        latent = prj(outputs.hidden_states[-1][:, -1, :].unsqueeze(1))
        latents.append(latent)
        if i == n - 1:
            embds = model.get_input_embeddings()(dec)
            mask = None
            if settings.fix_attn_mask:
                mask = torch.cat((enc_mask.bool(), torch.ones((B, n), dtype=torch.bool, device=device),
                                  torch.ones(dec.shape, dtype=torch.bool, device=device)), dim=1)
            outputs = model(inputs_embeds=embds, use_cache=True, output_hidden_states=True, attention_mask=mask,
                            **{key: cache})
            distill = 0
            for out, ref_out in zip(outputs.hidden_states, ref_outputs.hidden_states):
                ref_sel = ref_out.gather(1, ref_pos.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, ref_out.size(-1)))
                out_sel = out.gather(1, model_pos.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, out.size(-1)))
                fn = F.smooth_l1_loss if settings.distill_loss_type == "smooth_l1" else F.mse_loss
                tmp = fn(out_sel, ref_sel.detach())
                if settings.distill_loss_div_std:
                    if settings.distill_loss_type == "l2":
                        tmp = tmp / ref_sel.std()
                    tmp = tmp / ref_sel.std()
                distill = distill + tmp
            distill = distill / len(outputs.hidden_states)
            logits = outputs.logits
            ce = F.cross_entropy(logits[:, :-1, :].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                 ignore_index=IGNORE_INDEX)
    ref_logits = ref_outputs_with_grad.logits
    ref_ce = F.cross_entropy(ref_logits[:, :-1, :].reshape(-1, ref_logits.size(-1)),
                             batch["teacher_labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    total = ce + settings.distill_loss_factor * distill + settings.ref_loss_factor * ref_ce
    result = (total, ce, distill, ref_ce)
    return result + (latents,) if keep_latents else result


def released_step_loss(decoder, embedding, latents: list[torch.Tensor], padded_steps: list[list[list[int]]],
                       pad_id: int, dedup_inside_loop: bool = True) -> tuple[torch.Tensor, int]:
    """SIM-CoT's explain loss before its factor: (sum of the counted steps' CE / max(1, counted), counted).

    `latents[k]` is [B, 1, H]; `padded_steps` is pad_steps' output. dedup_inside_loop=True is the released
    call inside the per-row loop (CODI/src/model.py:492-494); False calls it once after the loop.
    """
    total, counted = 0.0, 0
    for k, latent in enumerate(latents):
        step_rows = []
        for row_steps in padded_steps:
            step_rows.append(row_steps[k])
            if dedup_inside_loop:
                step_rows = dedup_trailing_pads(step_rows, pad_id)
        if not dedup_inside_loop:
            step_rows = dedup_trailing_pads(step_rows, pad_id)
        indices = torch.tensor(step_rows, dtype=torch.long, device=latent.device)
        embeds = torch.cat([latent, embedding(indices)], dim=1)
        prefix = torch.full((indices.shape[0], 1), -570, dtype=indices.dtype, device=indices.device)
        with_prefix = torch.cat([prefix, indices], dim=1)
        mask = with_prefix != pad_id
        step_labels = with_prefix.masked_fill((with_prefix == -570) | (with_prefix == pad_id), IGNORE_INDEX)
        if (step_labels != IGNORE_INDEX).sum() == 0:
            continue
        logits = decoder(inputs_embeds=embeds, attention_mask=mask).logits
        total = total + F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), step_labels[:, 1:].reshape(-1),
                                        ignore_index=IGNORE_INDEX)
        counted += 1
    return total / max(1, counted), counted
