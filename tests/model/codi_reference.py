"""A plain, per-row reference of what the released CODI code computes, for tests only.

Training: zhenyi4/codi src/model.py:262-409 (CODI.forward); inference: test.py:211-296. Ported to transformers 5:
the KV cache carried from pass to pass is a DynamicCache (tuple-of-tuples caches no longer work), and position
ids are passed explicitly as what the released calls got implicitly: the cache position, i.e. the number of
tokens before, left padding included.

Each row of a collated batch (coconut_scale/data/codi_data.py) runs through its own n+4 model calls, on the
row's padded layout exactly as it sits in the batch, so the released quirks stay visible: the latent and answer
passes run without an attention mask and attend to the row's left-pad positions (model.py:334, 350), and a
padded row's question sits at positions shifted by its pad count. `strip_padding=True` instead runs each row
on its real tokens only, the intended per-row semantics. The batch-level reductions of the released code are
then formed from the per-row pieces: token means over the batch for both cross-entropies, SmoothL1/MSE means
and the std over all B*H values per hidden-state entry.

Answer positions are the final ones (the data layer already applied model.py:306-308 and 327-328).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CodiSettings:
    """The released CODI arguments that change the forward (src/model.py:96-117); defaults of the GSM8k-Aug
    scripts where they pass one (distill_loss_div_std), of the code otherwise."""

    num_latent: int = 6
    distill_loss_type: str = "smooth_l1"  # or "l2" (MSE); model.py:213-218
    distill_loss_div_std: bool = True
    distill_loss_factor: float = 1.0  # the Llama-1B script: 20
    ref_loss_factor: float = 1.0
    fix_attn_mask: bool = False  # "leave as False"; only the teacher passes and the answer pass get a mask
    strip_padding: bool = False  # True: each row on its own tokens (intended), not on its padded batch layout

    def __post_init__(self):
        if self.num_latent < 1:
            # model.py:331-382 computes the answer pass (and its logits) inside the latent loop: 0 crashes there.
            raise ValueError("the released forward needs num_latent >= 1")
        if self.distill_loss_type not in ("smooth_l1", "l2"):
            raise ValueError(f"distill_loss_type must be 'smooth_l1' or 'l2', got {self.distill_loss_type!r}")


@dataclass
class CodiLosses:
    total: torch.Tensor  # student_ce + distill_loss_factor * distill + ref_loss_factor * teacher_ce (model.py:400)
    student_ce: torch.Tensor
    distill: torch.Tensor  # unweighted: mean over hidden-state entries of distill_per_entry
    teacher_ce: torch.Tensor  # unweighted
    distill_per_entry: list[torch.Tensor] = field(default_factory=list)
    latents: list[list[torch.Tensor]] = field(default_factory=list)  # per row z_0..z_n, each [1, 1, H]


def codi_projection(hidden_size: int, prj_dim: int, dropout: float = 0.0, no_ln: bool = False) -> nn.Sequential:
    """model.py:192-200: Dropout, Linear(H, prj_dim), GELU, Linear(prj_dim, H), and LayerNorm(H) unless prj_no_ln."""
    prj = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, prj_dim), nn.GELU(),
                        nn.Linear(prj_dim, hidden_size))
    if not no_ln:
        prj.add_module("ln", nn.LayerNorm(hidden_size))
    return prj


def _cache_kwarg(model) -> str:
    # transformers renames past_key_values to cache (5.2x, with a deprecation shim); use whichever it declares.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _call(model, *, start: int, cache=None, input_ids=None, inputs_embeds=None, attention_mask=None):
    """One model call whose tokens sit at positions start, start+1, ... of the row."""
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    device = (input_ids if input_ids is not None else inputs_embeds).device
    kwargs = {} if cache is None else {_cache_kwarg(model): cache, "use_cache": True}
    return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 position_ids=torch.arange(start, start + length, device=device)[None], output_hidden_states=True,
                 **kwargs)


def student_row(model, prj, encoder_ids: torch.Tensor, encoder_mask: torch.Tensor, decoder_ids: torch.Tensor,
                num_latent: int, fix_attn_mask: bool = False):
    """The student of one row: question pass, num_latent latent passes, answer pass (model.py:281-350).

    encoder_ids / encoder_mask / decoder_ids are 1-D. Returns (answer-pass output, [z_0, ..., z_n]).
    """
    cache = DynamicCache(config=model.config)
    out = _call(model, start=0, cache=cache, input_ids=encoder_ids[None], attention_mask=encoder_mask[None])
    # hidden_states[-1] is after the final norm; the last column is bot (left padding puts it last).
    latent = prj(out.hidden_states[-1][:, -1:])
    latents = [latent]
    length = encoder_ids.shape[0]
    for i in range(num_latent):
        out = _call(model, start=length + i, cache=cache, inputs_embeds=latent)  # no mask: model.py:334
        latent = prj(out.hidden_states[-1][:, -1:])
        latents.append(latent)  # z_n (the last one) is computed and never fed, as in model.py:336-338
    mask = None
    if fix_attn_mask:  # model.py:289-290, 345-348: ones for latents and answer after the question's mask
        mask = torch.cat([encoder_mask, torch.ones(num_latent + decoder_ids.shape[0], dtype=encoder_mask.dtype,
                                                   device=encoder_mask.device)])[None]
    embeds = model.get_input_embeddings()(decoder_ids[None])
    answer = _call(model, start=length + num_latent, cache=cache, inputs_embeds=embeds, attention_mask=mask)
    return answer, latents


def _row_views(batch: dict, r: int, strip_padding: bool) -> dict:
    enc, enc_mask = batch["encoder_input_ids"][r], batch["encoder_attention_mask"][r]
    teacher, teacher_mask = batch["teacher_input_ids"][r], batch["teacher_attention_mask"][r]
    decoder, labels = batch["decoder_input_ids"][r], batch["labels"][r]
    if strip_padding:
        real = enc_mask.bool()
        enc, enc_mask = enc[real], enc_mask[real]
        n_teacher = int(teacher_mask.sum())
        teacher, teacher_mask = teacher[:n_teacher], teacher_mask[:n_teacher]
        n_decoder = int((labels != IGNORE_INDEX).sum())  # labels == decoder ids, -100 only on right padding
        decoder, labels = decoder[:n_decoder], labels[:n_decoder]
    return {"encoder_ids": enc, "encoder_mask": enc_mask, "teacher_ids": teacher, "teacher_mask": teacher_mask,
            "decoder_ids": decoder, "labels": labels, "teacher_labels": batch["teacher_labels"][r][:teacher.shape[0]],
            "teacher_position": int(batch["teacher_answer_position"][r]),
            "student_position": int(batch["student_answer_position"][r])}


def _shifted_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over the row of CE(logits[t], labels[t+1]) and the number of counted labels (model.py:377-381)."""
    targets = labels[1:]
    return F.cross_entropy(logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"), \
        int((targets != IGNORE_INDEX).sum())


def codi_losses(model, prj, batch: dict, settings: CodiSettings) -> CodiLosses:
    """CODI's training losses for a collated batch, one row at a time (see the module docstring)."""
    student_ce_sum, student_count = 0.0, 0
    teacher_ce_sum, teacher_count = 0.0, 0
    student_vectors, teacher_vectors, latents = [], [], []
    for r in range(batch["encoder_input_ids"].shape[0]):
        row = _row_views(batch, r, settings.strip_padding)
        answer, row_latents = student_row(model, prj, row["encoder_ids"], row["encoder_mask"], row["decoder_ids"],
                                          settings.num_latent, settings.fix_attn_mask)
        latents.append(row_latents)
        teacher_mask = row["teacher_mask"][None] if settings.fix_attn_mask else None  # model.py:276-277
        with torch.no_grad():  # the distillation targets (model.py:296-297)
            target = _call(model, start=0, input_ids=row["teacher_ids"][None], attention_mask=teacher_mask)
        teacher = _call(model, start=0, input_ids=row["teacher_ids"][None], attention_mask=teacher_mask)
        student_vectors.append([h[0, row["student_position"]] for h in answer.hidden_states])
        teacher_vectors.append([h[0, row["teacher_position"]] for h in target.hidden_states])
        ce, count = _shifted_ce_sum(answer.logits[0], row["labels"])
        student_ce_sum, student_count = student_ce_sum + ce, student_count + count
        ce, count = _shifted_ce_sum(teacher.logits[0], row["teacher_labels"])
        teacher_ce_sum, teacher_count = teacher_ce_sum + ce, teacher_count + count

    loss_fn = F.smooth_l1_loss if settings.distill_loss_type == "smooth_l1" else F.mse_loss
    per_entry = []
    for j in range(len(student_vectors[0])):  # every hidden_states entry: embeddings, blocks, final norm
        out = torch.stack([row[j] for row in student_vectors])  # [B, H]
        ref = torch.stack([row[j] for row in teacher_vectors]).detach()
        d = loss_fn(out, ref)  # mean over B*H
        if settings.distill_loss_div_std:
            std = ref.std()  # unbiased, over all B*H values (model.py:362-365)
            d = d / std / std if settings.distill_loss_type == "l2" else d / std
        per_entry.append(d)
    distill = torch.stack(per_entry).mean()
    student_ce = student_ce_sum / student_count
    teacher_ce = teacher_ce_sum / teacher_count
    total = student_ce + settings.distill_loss_factor * distill + settings.ref_loss_factor * teacher_ce
    return CodiLosses(total=total, student_ce=student_ce, distill=distill, teacher_ce=teacher_ce,
                      distill_per_entry=per_entry, latents=latents)


@torch.no_grad()
def greedy_answer(model, prj, question_ids: list[int], bot_id: int, eot_id: int, eos_id: int, num_latent: int,
                  remove_eos: bool = True, max_new_tokens: int = 256) -> list[int]:
    """test.py:182-296 with --greedy, for one question (its tokenized ids, BOS included as the tokenizer adds it).

    The generated ids end with eos when it was reached (test.py:284-289 keeps it). eot can never be emitted:
    test.py:257 cuts the logits to vocab_size-1, which drops exactly eot, the last row in their layout; here
    eot's logit is masked by id, which is the same there and right for any other layout.
    """
    device = model.get_input_embeddings().weight.device
    prefix = [bot_id] if remove_eos else [eos_id, bot_id]
    ids = torch.tensor(question_ids + prefix, device=device)
    cache = DynamicCache(config=model.config)
    out = _call(model, start=0, cache=cache, input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
    latent = prj(out.hidden_states[-1][:, -1:])
    position = ids.shape[0]
    for _ in range(num_latent):
        out = _call(model, start=position, cache=cache, inputs_embeds=latent)
        latent = prj(out.hidden_states[-1][:, -1:])
        position += 1
    embed = model.get_input_embeddings()
    step_in = embed(torch.tensor([[eot_id] if remove_eos else [eot_id, eos_id]], device=device))
    generated: list[int] = []
    for _ in range(max_new_tokens):
        out = _call(model, start=position, cache=cache, inputs_embeds=step_in)
        position += step_in.shape[1]
        logits = out.logits[0, -1].clone()
        logits[eot_id] = float("-inf")
        token = int(logits.argmax())
        generated.append(token)
        if token == eos_id:
            break
        step_in = embed(torch.tensor([[token]], device=device))
    return generated
