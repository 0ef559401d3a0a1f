"""The Coconut latent-feedback wrapper over any HF causal LM.

Semantics are those of the official implementation (facebookresearch/coconut, coconut.py): the input
embedding of each `<|latent|>` position is the last-layer hidden state at the position just before it,
filled in order, so latent k sees latents 1..k-1 already filled; the loss is the mean cross-entropy over
shifted labels that are not -100.

How it is computed (no Python loop over rows or positions):
  - The sequence is cut into passes at every column that holds a latent in some row. Pass 0 computes the
    prefix up to the first latent column; every later pass starts at a latent column, whose latent rows
    get the hidden state of the previous pass's last position, and runs up to the next latent column (or
    to the end). With the collator's aligned layout that is one pass per latent plus a prefix and a final
    pass, exactly the official schedule.
  - Each pass reuses the keys/values of the earlier ones through `PassCache`, which never mutates itself,
    so per-layer non-reentrant checkpointing (activation_checkpointing.py) recomputes exactly what forward saw.
  - `num_passes` lets the caller ask for more passes than this batch needs (extra passes split the longest
    stretch without latents). Distributed trainers all-reduce the max so every rank runs the same number of
    base-model calls; the wrapper itself knows nothing of distribution.
  - `latent_columns` (optional) is the plan's input as the collator knows it on the CPU; without it the plan
    reads the latent columns back from `input_ids` (one host sync, a stall on a GPU).
  - Every pass runs the decoder body alone and returns its final hidden states: the lm_head runs once, over
    the whole sequence, not once per pass (a one-column pass would pay a whole [V, h] weight gradient for one
    column). Training with labels never builds [B, T, V] logits: the loss comes from chunked_loss.py. Logits of
    every position are returned only when asked for (`return_logits=True`) or when there are no labels.
  - Training methods beyond the latent loop are child modules (`MethodPart`, model/method_part.py): a part named
    in `part_inputs` adds its loss terms to the output's `terms`, which the trainer weighs and adds to `loss`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from coconut_scale.model.activation_checkpointing import decoder_layers
from coconut_scale.model.chunked_loss import DEFAULT_LOSS_CHUNKS, chunked_shifted_cross_entropy
from coconut_scale.model.column_pass import one_column_pass
from coconut_scale.model.deferred_grad import (
    DeferredGrads,
    anchor,
    deferrable_weights,
    deferring,
    weights_unpartitioned,
)
from coconut_scale.model.kv_cache import PassCache
from coconut_scale.model.method_part import MethodPart
from coconut_scale.model.perturb import Perturbation
from coconut_scale.model.tokens import IGNORE_INDEX


class CoconutOutput(NamedTuple):
    """A NamedTuple (as the official `Outputs`): DeepSpeed's ZeRO-3 hooks must find the tensors in it."""

    loss: torch.Tensor | None  # the language-model loss of the latent loop (None without labels)
    logits: torch.Tensor | None  # None when labels were given and return_logits was not asked for
    inputs_embeds: torch.Tensor | None = None
    num_passes: int = 1
    terms: dict[str, torch.Tensor] | None = None  # the method parts' loss terms, by name (None: no part ran)
    # Every hidden-state entry of the last pass (embedding output, each block, the last after the final norm) at
    # one column per row, each [B, H]: what a part asked for with `state_columns` (None: no part asked).
    column_states: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class PassPlan:
    """Half-open column ranges, one per base-model call; `fills[i]` is True when range i starts at a latent column."""

    ranges: tuple[tuple[int, int], ...]
    fills: tuple[bool, ...]


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this HF model takes a KV cache: `cache` from transformers 5.2x on (where
    `past_key_values` still works but warns on every call), `past_key_values` before. A peft wrapper takes
    whatever its base model takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg_of(type(base))


def holds_data(t: torch.Tensor) -> bool:
    """Whether `t` has values to read: not a meta tensor, not a fake one (shapes only: FakeTensorMode)."""
    return not (t.is_meta or is_fake(t))


def latent_columns(input_ids: torch.Tensor, latent_id: int) -> list[int]:
    """Sorted columns that hold a latent in at least one row (one device sync)."""
    if not holds_data(input_ids):
        raise ValueError("input_ids has shapes but no values (a meta or fake tensor): pass latent_columns=, as the "
                         "collator knows them (LatentAlignedCollator.latent_columns), or compute them on a host copy")
    return torch.nonzero((input_ids == latent_id).any(dim=0)).flatten().tolist()


def count_passes(input_ids: torch.Tensor, latent_id: int, columns: Sequence[int] | None = None) -> int:
    """Base-model calls this batch needs: one per latent column, plus one (no sync when `columns` is given)."""
    return len(latent_columns(input_ids, latent_id) if columns is None else columns) + 1


def plan_passes(input_ids: torch.Tensor, latent_id: int, num_passes: int | None = None,
                columns: Sequence[int] | None = None) -> PassPlan:
    """`columns`: the latent columns if the caller already knows them (must equal `latent_columns(input_ids)`)."""
    seq_len = input_ids.shape[1]
    columns = latent_columns(input_ids, latent_id) if columns is None else sorted(int(c) for c in columns)
    if columns and columns[0] == 0:
        raise ValueError("a <|latent|> token sits at position 0: there is no earlier hidden state to feed it")
    bounds = [0, *columns, seq_len]
    ranges = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    fills = [False] + [True] * len(columns)
    target = num_passes or len(ranges)
    if target < len(ranges):
        raise ValueError(f"num_passes={target} is fewer than the {len(ranges)} passes this batch needs")
    if target > seq_len:
        raise ValueError(f"num_passes={target} exceeds the sequence length {seq_len}; cannot split that finely")
    while len(ranges) < target:
        # Split one column off the front of the longest range: the fill (if any) stays with that column, and
        # the last pass stays long, so its logits stay in the loss (see shifted_cross_entropy).
        i = max(range(len(ranges)), key=lambda j: ranges[j][1] - ranges[j][0])
        start, end = ranges[i]
        ranges[i : i + 1] = [(start, start + 1), (start + 1, end)]
        fills[i : i + 1] = [fills[i], False]
    return PassPlan(tuple(ranges), tuple(fills))


def example_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """A stable 32-bit key per row from its unpadded tokens (independent of padding side and batch)."""
    ids, mask = input_ids.tolist(), attention_mask.tolist()
    return [zlib.crc32(",".join(str(t) for t, m in zip(row, keep) if m).encode()) for row, keep in zip(ids, mask)]


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over next-token labels that are not -100 (0 when there are none, never NaN).

    The zero-weighted last column keeps every pass in the backward graph, even a pass that computes only
    the final position: under ZeRO-3 all ranks must run the same module backward hooks in the same order.
    """
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    keep_graph = logits[:, -1].sum() * 0.0
    if not (shift_labels != IGNORE_INDEX).any():
        return shift_logits.sum() * 0.0 + keep_graph
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX) + keep_graph


def column_states_of(states: Sequence[torch.Tensor], columns: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
    """Each entry of a pass's hidden states [B, T_pass, H] at row r's columns `columns[r]` (absolute, [B] or [B, K],
    in the pass that starts at `start`): a tuple of [B, H] (or [B, K, H]). A column outside that pass is refused
    when it is on the host (no device sync for that check)."""
    width = states[0].shape[1]
    offsets = columns.to(states[0].device) - start
    if offsets.device.type == "cpu" and holds_data(offsets) and bool(((offsets < 0) | (offsets >= width)).any()):
        raise ValueError(f"state columns {columns.tolist()} are not all in the last pass (columns {start} to "
                         f"{start + width - 1})")
    rows = torch.arange(offsets.shape[0], device=offsets.device)
    rows = rows[:, None] if offsets.dim() == 2 else rows
    return tuple(s[rows, offsets] for s in states)


# Config fields with which an HF causal LM transforms its lm_head output (Gemma 2/3, Cohere, Granite). The logits
# here are lm_head(hidden), as for GPT-2, Llama, Qwen, Mistral; a model that post-processes them is refused.
LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def refuse_logit_postprocessing(config) -> None:
    for name, neutral in LOGIT_POSTPROCESSING.items():
        value = getattr(config, name, neutral)
        if value != neutral and value is not None:
            raise ValueError(f"{type(config).__name__}.{name}={value}: this model transforms its lm_head output, "
                             f"which Coconut's loss and logits (lm_head of the last hidden state) do not do")


class Coconut(nn.Module):
    """Drop-in for the official `Coconut(base_causallm, latent_token_id, start_latent_id, end_latent_id, eos_token_id)`.

    feedback=False turns the latents into ordinary `<|latent|>` tokens (the paper's "pause as thought", and
    the "no continuous feedback" ablation at inference). `perturbation` adds noise to fed-back states.
    """

    # One weight-gradient matmul per linear over all one-column passes (deferred_grad.py); False: each pass its own.
    defer_weight_grads: bool = True

    def __init__(
        self,
        base_causallm: nn.Module,
        latent_token_id: int,
        start_latent_id: int,
        end_latent_id: int,
        eos_token_id: int,
        feedback: bool = True,
        perturbation: Perturbation | None = None,
        loss_chunks: int | None = DEFAULT_LOSS_CHUNKS,
    ):
        """`loss_chunks`: token chunks of the training loss (chunked_loss.py); at most ceil(B*(T-1)/loss_chunks)
        rows of logits exist at a time. A plain head takes the fused sweep (no extra compute); a ZeRO-3 or hooked
        head is called per chunk and backward recomputes its product (about a third more lm_head compute). None:
        the loss from full [B, T, V] logits (the logits are then returned too). Keep it equal on every rank."""
        super().__init__()
        self.loss_chunks = loss_chunks
        self.base_causallm = base_causallm
        self.latent_token_id = latent_token_id
        self.start_latent_id = start_latent_id
        self.end_latent_id = end_latent_id
        self.eos_token_id = eos_token_id
        self.feedback = feedback
        self.perturbation = perturbation
        self.num_layers = len(decoder_layers(base_causallm))
        self.feedback_part: str | None = None  # the part whose `project_feedback` maps fed-back states
        # Tokens generate() never emits (CODI: its eot, which their test.py cuts from the logits).
        self.suppressed_token_ids: tuple[int, ...] = ()
        refuse_logit_postprocessing(base_causallm.config)

    # -- method parts --------------------------------------------------------------------------------
    def add_part(self, part: MethodPart) -> MethodPart:
        """Make `part` a child module named `part.name` (its parameters join the wrapper's). A part with
        `projects_feedback` transforms every fed-back hidden state (training and generation alike)."""
        if part.name in self._modules:
            raise ValueError(f"this Coconut already has a child named {part.name!r}")
        if part.projects_feedback:
            if self.feedback_part is not None:
                raise ValueError(f"part {self.feedback_part!r} already projects the fed-back states")
            self.feedback_part = part.name
        self.add_module(part.name, part)
        return part

    def part(self, name: str) -> MethodPart | None:
        found = self._modules.get(name)
        return found if isinstance(found, MethodPart) else None

    # -- helpers -------------------------------------------------------------------------------------
    def count_passes(self, input_ids: torch.Tensor, latent_columns: Sequence[int] | None = None) -> int:
        return count_passes(input_ids, self.latent_token_id, latent_columns) if self.feedback else 1

    def _plan(self, input_ids: torch.Tensor, num_passes: int | None, columns: Sequence[int] | None) -> PassPlan:
        if self.feedback:
            return plan_passes(input_ids, self.latent_token_id, num_passes, columns)
        # No feedback: latents are plain tokens (no column is a latent one); still honour num_passes so ranks stay
        # in step.
        return plan_passes(input_ids, self.latent_token_id, num_passes, columns=())

    def _fill(self, chunk: torch.Tensor, ids_col: torch.Tensor, ordinal_col: torch.Tensor, prev_hidden: torch.Tensor,
              row_keys: list[int] | None = None):
        """Replace the first column of `chunk` by `prev_hidden` in rows whose token there is a latent."""
        is_latent = ids_col == self.latent_token_id
        if self.feedback_part is not None:
            prev_hidden = self._modules[self.feedback_part].project_feedback(prev_hidden)
        fed = prev_hidden.to(chunk.dtype)
        if self.perturbation is not None and bool(is_latent.any()):
            fed = fed.clone()
            for k in torch.unique(ordinal_col[is_latent]).tolist():
                rows = is_latent & (ordinal_col == k)
                keys = [row_keys[r] for r in rows.nonzero().flatten().tolist()] if row_keys else None
                fed[rows] = self.perturbation(fed[rows], int(k), row_keys=keys)
        first = torch.where(is_latent[:, None], fed, chunk[:, 0])
        return torch.cat([first[:, None], chunk[:, 1:]], dim=1)

    def _run_passes(self, input_ids, attention_mask, position_ids, plan: PassPlan, last_states: bool = False):
        """All passes of the plan through the decoder body alone (no lm_head call per pass); returns each pass's
        final hidden states (after the final norm), the filled embeddings, the final cache and, with
        `last_states`, every hidden-state entry of the last pass (else None)."""
        embeds = self.base_causallm.get_input_embeddings()(input_ids)
        ordinals = (input_ids == self.latent_token_id).long().cumsum(dim=1) - 1
        # Noise keyed by each row's own tokens: an example gets the same noise in any batch, on any rank.
        row_keys = example_keys(input_ids, attention_mask) if self.perturbation is not None else None
        decoder = self.base_causallm.get_decoder()
        cache = PassCache(self.num_layers)
        hiddens, filled, states = [], [], None
        # Deferred passes need the fill: it chains each later pass to the first one's (anchored) hidden states.
        deferred = None
        # Under ZeRO-3 (partitioned weights) every rank must run the same module calls: neither the deferral nor
        # skipping the recompute of one-column passes (whose widths differ between ranks) applies there.
        unpartitioned = weights_unpartitioned(decoder)
        if (self.defer_weight_grads and self.feedback and torch.is_grad_enabled() and len(plan.ranges) > 2
                and unpartitioned):
            deferred = DeferredGrads(deferrable_weights(decoder))
        for i, (start, end) in enumerate(plan.ranges):
            chunk = embeds[:, start:end]
            # Every pass after the first runs the fill (a no-op where its column holds no latent), whatever this
            # batch holds: under ZeRO-3, ranks with different latent counts must build graphs of the same shape,
            # or their module hooks diverge.
            if i > 0 and self.feedback:
                chunk = self._fill(chunk, input_ids[:, start], ordinals[:, start], hiddens[-1][:, -1], row_keys)
            filled.append(chunk)
            extra = {"output_hidden_states": True} if last_states and i == len(plan.ranges) - 1 else {}
            defer = deferred is not None and i > 0 and end - start == 1
            with (deferring(deferred) if defer else contextlib.nullcontext(),
                  one_column_pass() if end - start == 1 and unpartitioned else contextlib.nullcontext()):
                result = decoder(inputs_embeds=chunk, attention_mask=attention_mask[:, :end],
                                 position_ids=position_ids[:, start:end], use_cache=True,
                                 **{cache_kwarg(self.base_causallm): cache}, **extra)
            hidden = result.last_hidden_state
            hiddens.append(anchor(hidden, deferred) if deferred is not None and i == 0 else hidden)
            if extra:
                states = result.hidden_states
            cache = cache.extended()
        return hiddens, filled, cache, states

    # -- training ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        num_passes: int | None = None,
        latent_columns: Sequence[int] | None = None,
        return_logits: bool | None = None,
        part_inputs: dict[str, dict[str, torch.Tensor]] | None = None,
        state_columns: torch.Tensor | None = None,
    ) -> CoconutOutput:
        """`return_logits` defaults to `labels is None` (or `loss_chunks is None`): a training step then never
        holds [B, T, V] logits. `part_inputs`: {part name: its batch tensors} for each method part to run.
        `state_columns` (without `part_inputs`): columns of the last pass whose every hidden-state entry comes
        back in `column_states`, as a part's `state_columns` asks in training (the analyses read them)."""
        if not part_inputs:
            return self._forward_core(input_ids, attention_mask, labels, position_ids, num_passes, latent_columns,
                                      return_logits, state_columns)
        if state_columns is not None:
            raise ValueError("state_columns comes from the method parts when part_inputs is given")
        parts = {}
        for name in part_inputs:
            part = self.part(name)
            if part is None:
                raise ValueError(f"part_inputs names {name!r}, which is not a method part of this model")
            parts[name] = part
        columns = [c for name, part in parts.items() if (c := part.state_columns(part_inputs[name])) is not None]
        if len(columns) > 1:
            raise ValueError(f"more than one method part asks for hidden states at columns: {sorted(parts)}")
        out = self._forward_core(input_ids, attention_mask, labels, position_ids, num_passes, latent_columns,
                                 return_logits, columns[0] if columns else None)
        terms: dict[str, torch.Tensor] = {}
        for name, part in parts.items():
            terms.update(part.loss_terms(self, input_ids, part_inputs[name], out))
        return out._replace(terms=terms)

    def _forward_core(self, input_ids, attention_mask, labels, position_ids, num_passes, latent_columns,
                      return_logits, state_columns=None) -> CoconutOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        full_logits = bool(return_logits) or labels is None or self.loss_chunks is None
        if return_logits is None:
            return_logits = full_logits
        plan = self._plan(input_ids, num_passes, latent_columns)
        hiddens, filled, cache, states = self._run_passes(input_ids, attention_mask, position_ids, plan,
                                                          last_states=state_columns is not None)
        # The loss needs neither the keys/values nor the per-pass copies of the hidden states (nothing else keeps
        # them without gradients, nor the hidden states with them): dropped before the loss's logits exist.
        del cache
        hidden, inputs_embeds = torch.cat(hiddens, dim=1), torch.cat(filled, dim=1)
        del hiddens, filled
        column_states = None
        if state_columns is not None:
            column_states = column_states_of(states, state_columns, plan.ranges[-1][0])
        del states
        head = self.base_causallm.get_output_embeddings()
        if full_logits:
            logits = head(hidden)
            loss = shifted_cross_entropy(logits, labels) if labels is not None else None
            return CoconutOutput(loss=loss, logits=logits if return_logits else None, inputs_embeds=inputs_embeds,
                                 num_passes=len(plan.ranges), column_states=column_states)
        # Zero-weighted last column: the shift drops it, and it may be a whole (one-column) pass; this keeps
        # every pass in the backward graph (ZeRO-3 hook order, see shifted_cross_entropy).
        keep_graph = hidden[:, -1].sum() * 0.0
        loss = chunked_shifted_cross_entropy(hidden, labels, head, self.loss_chunks) + keep_graph
        return CoconutOutput(loss=loss, logits=None, inputs_embeds=inputs_embeds, num_passes=len(plan.ranges),
                             column_states=column_states)

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        position_ids: torch.Tensor | None = None,
        num_passes: int | None = None,
        sync_finished: Callable[[bool], bool] | None = None,
        latent_columns: Sequence[int] | None = None,
        stop_at_eos: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding for a left-padded batch; returns [input_ids | new tokens], EOS-padded after each row's EOS.

        `sync_finished(local_done) -> global_done`: under data parallelism the trainer passes an all-reduce, so
        a rank whose rows are all done keeps stepping (its rows emit EOS) until every rank is done.
        `stop_at_eos=False` always writes `max_new_tokens` (rows past their EOS keep writing EOS) and never reads a
        token back on the host: fixed-length benchmarks, and batches of fake tensors (check --measure).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        if input_ids.shape[1] and holds_data(attention_mask) and (attention_mask[:, -1] == 0).any():
            raise ValueError("generate() needs left padding: every row's last column must be a real token")
        plan = self._plan(input_ids, num_passes, latent_columns)
        hiddens, _, cache, _ = self._run_passes(input_ids, attention_mask, position_ids, plan)
        next_logits = self.base_causallm.get_output_embeddings()(hiddens[-1][:, -1])
        del hiddens, _  # the prompt's hidden states and filled embeddings: not needed while decoding
        batch = input_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        next_pos = position_ids[:, -1:] + 1
        new_tokens = []
        embed = self.base_causallm.get_input_embeddings()
        suppressed = list(self.suppressed_token_ids)
        for step in range(max_new_tokens):
            if suppressed:
                next_logits = next_logits.clone()
                next_logits[:, suppressed] = float("-inf")
            token = next_logits.argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, self.eos_token_id), token)
            new_tokens.append(token)
            finished |= token == self.eos_token_id
            if stop_at_eos:
                local_done = bool(finished.all())
                done = sync_finished(local_done) if sync_finished is not None else local_done
                if done:
                    break
            if step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            out = self.base_causallm(
                inputs_embeds=embed(token[:, None]),
                attention_mask=attention_mask,
                position_ids=next_pos,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kwarg(self.base_causallm): cache},
            )
            cache = cache.extended()
            next_pos = next_pos + 1
            next_logits = out.logits[:, -1]
        if not new_tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
