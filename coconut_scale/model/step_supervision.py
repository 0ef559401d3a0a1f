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

The decoder is a submodule of the wrapper (`step_decoder`), so ZeRO-3 partitions it with the base model and
every checkpoint carries it; with `decoder: shared` there is no submodule and the base model decodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from coconut_scale.model.coconut import Coconut
from coconut_scale.model.tokens import IGNORE_INDEX

DECODER_NAME = "step_decoder"  # the submodule's name: state-dict keys start with "step_decoder."
DECODER_PREFIX = DECODER_NAME + "."
STEP_KEYS = ("step_targets", "step_lengths", "step_rows", "step_index", "step_prompts", "step_prompt_lengths")


class StepSupervisedOutput(NamedTuple):
    """CoconutOutput's fields, then the two parts of the loss (detached copies are what the trainer logs)."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    inputs_embeds: torch.Tensor | None = None
    num_passes: int = 1
    coconut_loss: torch.Tensor | None = None
    step_loss: torch.Tensor | None = None


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
                   prompts: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None) -> DecoderInputs:
    """The layout of the module doc for N pairs. `targets` [N, Lt] are EOS-padded (Lt > every length);
    `prompts` [N, P] are left-padded step prompts, `prompt_lengths` [N] their real lengths."""
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
    positions = attention.cumsum(dim=1).clamp_min(1)
    labels = torch.where(torch.arange(lt, device=device) <= lengths[:, None], targets, IGNORE_INDEX)
    return DecoderInputs(embeds, attention, positions, p + c - 1, labels)


def step_loss_from_hidden(hidden: torch.Tensor, head: nn.Module, inputs: DecoderInputs, step_index: torch.Tensor
                          ) -> torch.Tensor:
    """SIM-CoT's reduction (module doc) of the CE of `head(hidden)` on the pairs' labels."""
    lt = inputs.labels.shape[1]
    predicting = hidden[:, inputs.first:inputs.first + lt]  # position j predicts target token j
    keep = inputs.labels != IGNORE_INDEX
    token_loss = F.cross_entropy(head(predicting[keep]).float(), inputs.labels[keep], reduction="none")
    pair_of_token = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    pair_loss = torch.zeros(keep.shape[0], device=hidden.device).index_add(0, pair_of_token, token_loss)
    rows_per_step = torch.bincount(step_index)
    return (pair_loss / rows_per_step[step_index]).sum() / rows_per_step.numel()


class StepSupervisedCoconut(Coconut):
    """A Coconut wrapper with a step decoder; see `add_step_decoder` and the module doc.

    Without step tensors in the call (validation loss, generation) it is exactly its Coconut.
    """

    step_decoder: nn.Module | None
    step_c_thought: int
    step_loss_weight: float

    @property
    def decoder(self) -> nn.Module:
        return self.step_decoder if self.step_decoder is not None else self.base_causallm

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, num_passes=None,
                latent_columns=None, return_logits=None, step_targets=None, step_lengths=None, step_rows=None,
                step_index=None, step_prompts=None, step_prompt_lengths=None):
        out = super().forward(input_ids, attention_mask=attention_mask, labels=labels, position_ids=position_ids,
                              num_passes=num_passes, latent_columns=latent_columns, return_logits=return_logits)
        if step_targets is None:
            return out
        step_loss = self.step_loss(input_ids, out.inputs_embeds, step_targets, step_lengths, step_rows, step_index,
                                   step_prompts, step_prompt_lengths)
        loss = step_loss * self.step_loss_weight if out.loss is None else out.loss + self.step_loss_weight * step_loss
        return StepSupervisedOutput(loss=loss, logits=out.logits, inputs_embeds=out.inputs_embeds,
                                    num_passes=out.num_passes, coconut_loss=out.loss, step_loss=step_loss)

    def step_loss(self, input_ids, inputs_embeds, targets, lengths, rows, steps, prompts=None, prompt_lengths=None):
        """The step decoder's loss (module doc) for the flat (row, step) pairs of data/step_targets.py."""
        embed = self.base_causallm.get_input_embeddings()
        decoder = self.decoder
        weight = 1.0
        if targets.shape[0] == 0:
            # No pair on this rank: one dummy pair through the same module calls, with zero weight (ZeRO-3 needs
            # every rank to run the same hooks in the same order).
            targets = torch.full((1, 1), self.eos_token_id, dtype=torch.long, device=input_ids.device)
            lengths = rows = steps = torch.zeros(1, dtype=torch.long, device=input_ids.device)
            prompts = prompt_lengths = None
            weight = 0.0
        thoughts = gather_thoughts(inputs_embeds, input_ids, self.latent_token_id, self.step_c_thought, rows, steps)
        inputs = decoder_inputs(thoughts, embed, targets, lengths, prompts, prompt_lengths)
        # use_cache=False: a DynamicCache would be appended to again when checkpointing recomputes a layer.
        out = decoder(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                      position_ids=inputs.position_ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        # The zero-weighted last-position logits keep the decoder's own lm_head call in the graph (ZeRO-3 hooks).
        loss = step_loss_from_hidden(out.hidden_states[-1], decoder.get_output_embeddings(), inputs, steps)
        return loss * weight + out.logits.float().sum() * 0.0

    @torch.no_grad()
    def decode_steps(self, input_ids, inputs_embeds, rows, steps, eos_id: int, max_new_tokens: int = 32,
                     prompts=None, prompt_lengths=None) -> list[list[int]]:
        """Greedy decoding of latent step `steps[i]` of row `rows[i]` (all pairs in one batch per new token);
        returns each pair's tokens up to (not including) its first EOS."""
        embed = self.base_causallm.get_input_embeddings()
        thoughts = gather_thoughts(inputs_embeds, input_ids, self.latent_token_id, self.step_c_thought, rows, steps)
        n = thoughts.shape[0]
        generated = torch.zeros((n, 0), dtype=torch.long, device=thoughts.device)
        done = torch.zeros(n, dtype=torch.bool, device=thoughts.device)
        for _ in range(max_new_tokens):
            # Lengths = tokens so far: the "EOS" slot of decoder_inputs is where the next token is predicted.
            lengths = torch.full((n,), generated.shape[1], dtype=torch.long, device=thoughts.device)
            padded = torch.cat([generated, torch.full((n, 1), eos_id, device=thoughts.device)], dim=1)
            inputs = decoder_inputs(thoughts, embed, padded, lengths, prompts, prompt_lengths)
            hidden = self.decoder(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                                  position_ids=inputs.position_ids, output_hidden_states=True,
                                  logits_to_keep=1, use_cache=False).hidden_states[-1]
            logits = self.decoder.get_output_embeddings()(hidden[:, inputs.first + generated.shape[1]])
            token = torch.where(done, eos_id, logits.argmax(dim=-1))
            generated = torch.cat([generated, token[:, None]], dim=1)
            done |= token == eos_id
            if bool(done.all()):
                break
        out = []
        for row in generated.tolist():
            out.append(row[:row.index(eos_id)] if eos_id in row else row)
        return out


def add_step_decoder(model: Coconut, decoder: nn.Module | None, c_thought: int, weight: float) -> StepSupervisedCoconut:
    """Give a Coconut wrapper its step decoder, in place (`decoder=None`: the base model decodes).

    The wrapper stays the same object, so whatever already holds it (LoRA, the engine, exports) sees one model
    that has gained a submodule; its state-dict keys are those of the Coconut plus `step_decoder.*`.
    """
    if c_thought < 1:
        raise ValueError(f"step supervision needs c_thought >= 1 latents per step, got {c_thought}")
    model.__class__ = StepSupervisedCoconut
    model.step_decoder = decoder
    model.step_c_thought = int(c_thought)
    model.step_loss_weight = float(weight)
    return model


def apply_decoder_lora(decoder: nn.Module, lora_cfg) -> nn.Module:
    """LoRA adapters on a separate decoder copy (the recipe's `lora` section, same targets as the base), the rest
    frozen. The decoder has no Coconut tokens, so none of the base's new-row machinery (model/lora.py) applies."""
    from peft import LoraConfig, get_peft_model

    from coconut_scale.model.shapes import default_lora_targets

    model_type = decoder.config.model_type
    targets = list(lora_cfg.target_modules) if lora_cfg.target_modules else default_lora_targets(model_type)
    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, fan_in_fan_out=model_type == "gpt2", bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(decoder, config, autocast_adapter_dtype=False)  # one dtype: see model/lora.py


def load_step_decoder(recipe, vocab_size: int) -> nn.Module | None:
    """The recipe's separate decoder (None for `decoder: shared`), loaded like the base model so that it is
    partitioned the same way under ZeRO-3 (the caller keeps its HfDeepSpeedConfig alive). Not resized: it never
    reads a Coconut token, and only its lm_head is used (inputs come from the base's embedding table)."""
    from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
    from coconut_scale.model.loading import load_causal_lm

    kind = recipe.coconut.step_supervision.decoder
    if kind == "shared":
        return None
    m = recipe.model
    from_checkpoint = kind == "copy" and recipe.checkpoint.init_from
    decoder = load_causal_lm(
        recipe.checkpoint.init_from if from_checkpoint else m.name_or_path,
        dtype=m.dtype, attn_implementation=m.attn_implementation,
        gguf_file=None if from_checkpoint else m.gguf_file,
        from_config=None if from_checkpoint else m.from_config,
        vocab_size=vocab_size, seed=recipe.seed,
    )
    if m.gradient_checkpointing:
        enable_latent_safe_checkpointing(decoder)
    return decoder


# -- exports: the decoder beside the model, and back -----------------------------------------------------------
EXPORT_DIR = "step_decoder"  # <export>/step_decoder/: a plain HF model + STEP_CONFIG
STEP_CONFIG = "step_supervision.json"


def split_decoder_state(state: dict) -> tuple[dict, dict]:
    """A wrapper state dict -> (the Coconut's own keys, the decoder's keys without the `step_decoder.` prefix)."""
    own = {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIX)}
    decoder = {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    return own, decoder


def _merged_decoder_state(decoder: nn.Module, state: dict) -> tuple[nn.Module, dict]:
    """(plain HF model, its state) of a decoder: LoRA adapters merged (W + scaling * B @ A), peft names dropped."""
    from coconut_scale.model.lora import ADAPTER, PEFT_PREFIX, lora_layout

    if not hasattr(decoder, "get_base_model"):
        return decoder, state
    plain, lora_a, lora_b = {}, {}, {}
    for key, value in state.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if f".lora_A.{ADAPTER}." in name:
            lora_a[name.split(".lora_A.")[0]] = value
        elif f".lora_B.{ADAPTER}." in name:
            lora_b[name.split(".lora_B.")[0]] = value
        else:
            plain[name.replace(".base_layer.", ".")] = value
    for module, (scaling, fan_in_fan_out) in lora_layout(decoder).items():
        update = (lora_b[module].float() @ lora_a[module].float()) * scaling
        weight = plain[module + ".weight"]
        plain[module + ".weight"] = (weight.float() + (update.T if fan_in_fan_out else update)).to(weight.dtype)
    return decoder.get_base_model(), plain


def write_decoder_export(model: "StepSupervisedCoconut", decoder_state: dict, directory, prompt: str | None) -> None:
    """`<directory>/step_decoder/`: the decoder as a plain HF model (adapters merged) and how it was trained.
    Rank 0, with the consolidated state. A shared decoder writes only the config (the export is the decoder)."""
    import json
    from pathlib import Path

    out = Path(directory) / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    shared = model.step_decoder is None
    if not shared:
        hf_model, state = _merged_decoder_state(model.step_decoder, decoder_state)
        hf_model.save_pretrained(str(out), state_dict=state)
    config = {"c_thought": model.step_c_thought, "weight": model.step_loss_weight, "prompt": prompt, "shared": shared}
    (out / STEP_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_decoder_config(export_dir) -> dict:
    import json
    from pathlib import Path

    from coconut_scale.model.export_meta import ExportFormatError

    path = Path(export_dir) / EXPORT_DIR / STEP_CONFIG
    if not path.is_file():
        raise ExportFormatError(f"{path} not found: {export_dir} was exported without its step decoder "
                                f"(train with coconut.step_supervision.export_decoder: true)")
    return json.loads(path.read_text())
