"""Step-level supervision of the continuous thoughts (SIM-CoT: Wei et al. 2025, InternLM/SIM-CoT), exact and batched.

An auxiliary decoder must decode each latent step back into the text of the reasoning step it replaced. For
every (row, latent step k) pair of a batch (targets: data/step_targets.py) its input is

    [left padding] [step prompt k] [the c_thought filled latent embeddings of step k] [target tokens] [EOS] [padding]

The thoughts are Coconut's own filled input embeddings (`CoconutOutput.inputs_embeds` at the <|latent|>
positions), not detached: the step loss trains the base model through them. Prompt and target tokens are embedded
with the BASE model's input table, as SIM-CoT does (the decoder's own table is never read; only its lm_head).
Attention covers the prompt, thoughts, targets and the first EOS; position ids count 1, 2, ... over those (their
code: arange(1, L + 1)); the labels are the target tokens and that EOS.

Reduction (their code): per step k, the token CE summed over pairs of that step, divided by the number of rows
that have step k; those are summed over steps and divided by the number of steps K (the most any row of the
batch has; theirs reads K from row 0). The model's loss is then  coconut_loss + weight * step_loss.

All pairs go through the decoder in ONE call, whatever each row's step count. A batch (or a rank) with no pair
still calls the decoder and its head once, on a dummy input with zero weight: under ZeRO-3 every rank must run
the same modules' hooks.

`StepSupervision` is the method part (model/method_part.py): a child module of the Coconut wrapper named
`step_supervision`, holding the decoder as its child `decoder`, so ZeRO-3 partitions the decoder with the base
model and every checkpoint carries it; with `decoder: shared` it holds none and the base model decodes. Its loss
term is "step"; the trainer adds `weight * step` to the Coconut loss (train/losses.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from coconut_scale.model.chunked_loss import DEFAULT_LOSS_CHUNKS, chunked_weighted_cross_entropy
from coconut_scale.model.method_part import MethodPart
from coconut_scale.model.tokens import IGNORE_INDEX

STEP_KEYS = ("step_targets", "step_lengths", "step_rows", "step_index", "step_prompts", "step_prompt_lengths")


class DecoderInputs(NamedTuple):
    """One batched decoder call: embeddings [N, S, H], attention [N, S], positions [N, S]; `first` is the column
    whose output predicts the first target token (the last thought), `labels` [N, Lt] the target tokens with
    IGNORE_INDEX after each pair's EOS."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    first: int
    labels: torch.Tensor


def latent_column_table(input_ids: torch.Tensor, latent_id: int) -> torch.Tensor:
    """[B, T]: entry (r, j) is the column of row r's j-th latent (0 where the row has fewer). No host sync."""
    batch, width = input_ids.shape
    is_latent = input_ids == latent_id
    ordinal = torch.where(is_latent, is_latent.long().cumsum(dim=1) - 1, width)  # non-latents go to a spare slot
    table = torch.zeros(batch, width + 1, dtype=torch.long, device=input_ids.device)
    columns = torch.arange(width, device=input_ids.device).expand(batch, width)
    return table.scatter_(1, ordinal, columns)[:, :width]


def gather_thoughts(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, latent_id: int, c_thought: int,
                    rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[N, c_thought, H]: the filled latent embeddings of latent step `steps[i]` of row `rows[i]`."""
    table = latent_column_table(input_ids, latent_id)
    ordinals = steps[:, None] * c_thought + torch.arange(c_thought, device=steps.device)
    columns = table[rows[:, None], ordinals]
    return inputs_embeds[rows[:, None], columns]


def decoder_inputs(thoughts: torch.Tensor, embed: nn.Module, targets: torch.Tensor, lengths: torch.Tensor,
                   prompts: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
                   first_position: int = 1) -> DecoderInputs:
    """The layout of the module doc for N pairs. `targets` [N, Lt] are EOS-padded (Lt > every length);
    `prompts` [N, P] are left-padded step prompts, `prompt_lengths` [N] their real lengths. `first_position`: the
    position id of the first attended token (SIM-CoT's Coconut code: 1; its CODI code, HF's default: 0)."""
    n, c = thoughts.shape[0], thoughts.shape[1]
    device = targets.device
    if prompts is None or prompts.shape[1] == 0:
        prompts = targets.new_zeros((n, 0))
        prompt_lengths = targets.new_zeros((n,))
    p, lt = prompts.shape[1], targets.shape[1]
    embeds = torch.cat([embed(prompts), thoughts, embed(targets)], dim=1)
    prompt_mask = torch.arange(p, device=device) >= (p - prompt_lengths)[:, None]
    body_mask = torch.arange(c + lt, device=device) <= (c + lengths)[:, None]  # through the first EOS
    attention = torch.cat([prompt_mask, body_mask], dim=1).long()
    positions = (attention.cumsum(dim=1) - 1 + first_position).clamp_min(first_position)
    labels = torch.where(torch.arange(lt, device=device) <= lengths[:, None], targets, IGNORE_INDEX)
    return DecoderInputs(embeds, attention, positions, p + c - 1, labels)


def step_loss_from_hidden(hidden: torch.Tensor, head: nn.Module, inputs: DecoderInputs, step_index: torch.Tensor,
                          num_chunks: int = DEFAULT_LOSS_CHUNKS, reduction: str = "rows") -> torch.Tensor:
    """SIM-CoT's reduction (module doc) of the CE of `head(hidden)` on the pairs' labels. `reduction` "rows" is
    their Coconut code's (per step: the pairs' token-mean CEs summed, over the rows that have the step); "tokens"
    their CODI code's (per step: one token mean over all the step's labelled tokens); both then average the steps.

    Every shape here is known from the input shapes alone: the count of pairs per step is an index_add over N slots
    (step k < K <= N) and the labelled tokens are weighted, not selected, so nothing needs a host sync and the step
    runs on fake or meta tensors and under torch.compile. The head's logits exist one token chunk at a time
    (chunked_loss.py), as for the Coconut loss.
    """
    labels = inputs.labels
    n, lt = labels.shape
    predicting = hidden[:, inputs.first:inputs.first + lt]  # position j predicts target token j
    ones = torch.ones(n, dtype=torch.float32, device=hidden.device)
    pairs_per_step = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(0, step_index, ones)
    steps = (pairs_per_step > 0).sum()
    if reduction == "tokens":
        labelled = (labels != IGNORE_INDEX).float().sum(dim=1)
        per_step = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(0, step_index, labelled)
        pair_weight = 1.0 / (per_step[step_index] * steps)  # 1 / (labelled tokens of the pair's step * K)
    else:
        pair_weight = 1.0 / (pairs_per_step[step_index] * steps)  # 1 / (rows that have the pair's step * K)
    token_weight = pair_weight[:, None].expand(n, lt)
    return chunked_weighted_cross_entropy(predicting.reshape(n * lt, -1), labels.reshape(-1),
                                          token_weight.reshape(-1), head, num_chunks)


class StepSupervision(MethodPart):
    """SIM-CoT's step decoder as a method part of a Coconut wrapper (see the module doc)."""

    name = "step_supervision"
    terms = ("step",)

    def __init__(self, decoder: nn.Module | None, c_thought: int, layout: str = "coconut"):
        """`layout` "codi": SIM-CoT's CODI variant: step k decodes CODI's z_k (k = 0..num_latent: the filled
        latents, then z_n from the CODI part), positions from 0, the "tokens" reduction (data/codi_steps.py)."""
        super().__init__()
        if c_thought < 1:
            raise ValueError(f"step supervision needs c_thought >= 1 latents per step, got {c_thought}")
        if layout not in ("coconut", "codi"):
            raise ValueError(f"step supervision layout must be 'coconut' or 'codi', got {layout!r}")
        self.decoder = decoder  # None: the base model decodes (decoder: shared)
        self.c_thought = int(c_thought)
        self.layout = layout

    def decoder_of(self, core) -> nn.Module:
        return self.decoder if self.decoder is not None else core.base_causallm

    def loss_terms(self, core, input_ids, inputs: dict[str, torch.Tensor], out) -> dict[str, torch.Tensor]:
        """The step decoder's loss for the flat (row, step) pairs of data/step_targets.py (`inputs` holds STEP_KEYS)."""
        last = None
        if self.layout == "codi":
            codi = core.part("codi")
            if codi is None:
                raise ValueError("step supervision with layout 'codi' needs the model's CODI part")
            last = codi.last_thought(out)
        return {"step": self.step_loss(core, input_ids, out.inputs_embeds, inputs, last)}

    def steps_of(self, n_latents: int) -> int:
        """Latent steps the decoder reads in a prompt of `n_latents` latents: n_latents / c_thought; the "codi"
        layout's n + 1 (z_0..z_n)."""
        return n_latents + 1 if self.layout == "codi" else n_latents // self.c_thought

    def thoughts(self, core, input_ids, inputs_embeds, rows, steps, last_thought=None) -> torch.Tensor:
        """[N, c, H]: the thoughts of latent step `steps[i]` of row `rows[i]`, as the layout reads them: the
        c_thought filled latents of the step; "codi": z_k (one thought), with `last_thought` CODI's z_n."""
        if self.layout == "codi":
            return self._codi_thoughts(core, input_ids, inputs_embeds, last_thought, rows, steps)
        return gather_thoughts(inputs_embeds, input_ids, core.latent_token_id, self.c_thought, rows, steps)

    def layout_inputs(self, thoughts, embed, targets, lengths, prompts=None, prompt_lengths=None) -> DecoderInputs:
        """The decoder's input for the pairs (decoder_inputs); "codi": no step prompt, positions from 0."""
        if self.layout == "codi":
            return decoder_inputs(thoughts, embed, targets, lengths, first_position=0)
        return decoder_inputs(thoughts, embed, targets, lengths, prompts, prompt_lengths)

    def _codi_thoughts(self, core, input_ids, inputs_embeds, last_thought, rows, steps) -> torch.Tensor:
        """[N, 1, H]: z_steps[i] of row rows[i]; z_0..z_{n-1} are the filled latents, z_n is `last_thought`."""
        n = core.part("codi").spec.num_latent  # every CODI row holds exactly n latents: no host sync
        table = latent_column_table(input_ids, core.latent_token_id)[:, :n]
        latents = inputs_embeds[torch.arange(input_ids.shape[0], device=input_ids.device)[:, None], table]
        every = torch.cat([latents, last_thought[:, None].to(inputs_embeds.dtype)], dim=1)  # [B, n + 1, H]
        return every[rows, steps][:, None]

    def step_loss(self, core, input_ids, inputs_embeds, inputs: dict[str, torch.Tensor],
                  last_thought: torch.Tensor | None = None) -> torch.Tensor:
        targets, lengths, rows, steps = (inputs[k] for k in ("step_targets", "step_lengths", "step_rows", "step_index"))
        prompts, prompt_lengths = inputs.get("step_prompts"), inputs.get("step_prompt_lengths")
        embed = core.base_causallm.get_input_embeddings()
        decoder = self.decoder_of(core)
        weight = 1.0
        if targets.shape[0] == 0:
            # No pair on this rank: one dummy pair through the same module calls, with zero weight (ZeRO-3 needs
            # every rank to run the same hooks in the same order).
            targets = torch.full((1, 1), core.eos_token_id, dtype=torch.long, device=input_ids.device)
            lengths = rows = steps = torch.zeros(1, dtype=torch.long, device=input_ids.device)
            prompts = prompt_lengths = None
            weight = 0.0
        thoughts = self.thoughts(core, input_ids, inputs_embeds, rows, steps, last_thought)
        dec_inputs = self.layout_inputs(thoughts, embed, targets, lengths, prompts, prompt_lengths)
        # use_cache=False: a DynamicCache would be appended to again when checkpointing recomputes a layer.
        dec_out = decoder(inputs_embeds=dec_inputs.embeds, attention_mask=dec_inputs.attention_mask,
                          position_ids=dec_inputs.position_ids, output_hidden_states=True, logits_to_keep=1,
                          use_cache=False)
        # The zero-weighted last-position logits keep the decoder's own lm_head call in the graph (ZeRO-3 hooks).
        loss = step_loss_from_hidden(dec_out.hidden_states[-1], decoder.get_output_embeddings(), dec_inputs, steps,
                                     reduction="tokens" if self.layout == "codi" else "rows")
        return loss * weight + dec_out.logits.float().sum() * 0.0

    def next_token_inputs(self, embed, thoughts, generated, eos_id: int, prompts=None,
                          prompt_lengths=None) -> DecoderInputs:
        """The layout's input that predicts the token after `generated` [N, g]: the training input with targets
        `generated` + EOS, where the output at column first + g predicts label g, the next token."""
        n, g = generated.shape
        lengths = torch.full((n,), g, dtype=torch.long, device=generated.device)
        padded = torch.cat([generated, torch.full((n, 1), eos_id, dtype=torch.long, device=generated.device)], dim=1)
        return self.layout_inputs(thoughts, embed, padded, lengths, prompts, prompt_lengths)

    @torch.no_grad()
    def decode_steps(self, core, input_ids, inputs_embeds, rows, steps, eos_id: int, max_new_tokens: int = 32,
                     prompts=None, prompt_lengths=None, last_thought=None) -> list[list[int]]:
        """Greedy decoding of latent step `steps[i]` of row `rows[i]` (all pairs in one batch per new token);
        returns each pair's tokens up to (not including) its first EOS. `last_thought`: CODI's z_n [B, H]
        ("codi" layout, CodiPart.prompt_thoughts)."""
        embed = core.base_causallm.get_input_embeddings()
        decoder = self.decoder_of(core)
        thoughts = self.thoughts(core, input_ids, inputs_embeds, rows, steps, last_thought)
        n = thoughts.shape[0]
        generated = torch.zeros((n, 0), dtype=torch.long, device=thoughts.device)
        done = torch.zeros(n, dtype=torch.bool, device=thoughts.device)
        for _ in range(max_new_tokens):
            dec_inputs = self.next_token_inputs(embed, thoughts, generated, eos_id, prompts, prompt_lengths)
            hidden = decoder(inputs_embeds=dec_inputs.embeds, attention_mask=dec_inputs.attention_mask,
                             position_ids=dec_inputs.position_ids, output_hidden_states=True,
                             logits_to_keep=1, use_cache=False).hidden_states[-1]
            logits = decoder.get_output_embeddings()(hidden[:, dec_inputs.first + generated.shape[1]])
            token = torch.where(done, eos_id, logits.argmax(dim=-1))
            generated = torch.cat([generated, token[:, None]], dim=1)
            done |= token == eos_id
            if bool(done.all()):
                break
        out = []
        for row in generated.tolist():
            out.append(row[:row.index(eos_id)] if eos_id in row else row)
        return out
