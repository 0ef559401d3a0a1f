"""A recipe's model, resolved once: where each model loads from and the `ModelSpec` the builder takes.

The one place that decides which source a recipe's model (and tokenizer) loads from:
  - `checkpoint.init_from` set: that HF export (a stage-0 CoT model, say), with its own config and tokenizer;
  - else `model.name_or_path`, with `model.gguf_file` (dequantised on load) or `model.from_config` (random init).
SIM-CoT's separate step decoder loads from `model.name_or_path` (`decoder: pretrained`, their setting: the
pretrained base, not the Coconut checkpoint) or from what the base loads (`decoder: copy`).
"""

from __future__ import annotations

from dataclasses import dataclass

from coconut_scale.model.codi import CodiSpec
from coconut_scale.model.loading import ModelSource
from coconut_scale.model.spec import LoraSpec, ModelSpec, StepSupervisionSpec


@dataclass(frozen=True)
class TokenizerSource:
    """A pretrained tokenizer (`path`, with `gguf_file`), or a byte-level BPE of `bpe_vocab` tokens fit on the
    training file (`model.tokenizer: train-bpe:N`; `path` None)."""

    path: str | None
    gguf_file: str | None = None
    bpe_vocab: int | None = None


def tokenizer_source(recipe) -> TokenizerSource:
    """checkpoint.init_from's own tokenizer when set; else model.tokenizer, else the model's (with its GGUF)."""
    m = recipe.model
    if recipe.checkpoint.init_from:
        return TokenizerSource(recipe.checkpoint.init_from)
    if m.bpe_vocab_size is not None:
        return TokenizerSource(None, bpe_vocab=m.bpe_vocab_size)
    if m.tokenizer:
        return TokenizerSource(m.tokenizer)
    return TokenizerSource(m.name_or_path, gguf_file=m.gguf_file)


def base_source(recipe) -> ModelSource:
    """The base model's weights: checkpoint.init_from when set, else model.name_or_path (+ gguf / from_config)."""
    if recipe.checkpoint.init_from:
        return ModelSource(recipe.checkpoint.init_from)
    return pretrained_source(recipe)


def pretrained_source(recipe) -> ModelSource:
    """model.name_or_path with its gguf_file or from_config: the model a run starts from before any training."""
    m = recipe.model
    return ModelSource(m.name_or_path, gguf_file=m.gguf_file, from_config=m.from_config)


def step_decoder_source(recipe) -> ModelSource | None:
    """SIM-CoT's separate decoder (None: `decoder: shared`, the base model decodes)."""
    kind = recipe.coconut.step_supervision.decoder
    if kind == "shared":
        return None
    return base_source(recipe) if kind == "copy" else pretrained_source(recipe)


def lora_spec(recipe) -> LoraSpec | None:
    lora = recipe.lora
    if not lora.enabled:
        return None
    targets = tuple(lora.target_modules) if lora.target_modules else None
    return LoraSpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets)


def codi_spec(recipe) -> CodiSpec | None:
    """method codi: the model's CODI switches (the loss factors are loss weights); None for Coconut."""
    if recipe.method != "codi":
        return None
    c = recipe.codi
    return CodiSpec(num_latent=c.num_latent, use_prj=c.use_prj, prj_dim=c.prj_dim, prj_dropout=c.prj_dropout,
                    prj_no_ln=c.prj_no_ln, distill_loss_type=c.distill_loss_type,
                    distill_loss_div_std=c.distill_loss_div_std)


def model_spec(recipe) -> ModelSpec:
    """What `model.spec.build_training_model` builds for this recipe."""
    m, c = recipe.model, recipe.coconut
    step = None
    if c.step_supervision.enabled:
        codi = recipe.method == "codi"  # one thought per step, z_0..z_n (model/step_supervision.py layout codi)
        step = StepSupervisionSpec(decoder=step_decoder_source(recipe), c_thought=1 if codi else c.c_thought,
                                   layout="codi" if codi else "coconut")
    return ModelSpec(source=base_source(recipe), dtype=m.dtype, attn_implementation=m.attn_implementation,
                     seed=recipe.seed, init_text=m.init_text, gradient_checkpointing=m.gradient_checkpointing,
                     feedback=c.mode == "coconut", lora=lora_spec(recipe), step_supervision=step,
                     codi=codi_spec(recipe))


def loss_weights(recipe) -> dict[str, float]:
    """The weight of each method part's loss term in the training loss (train/losses.py). CODI's total is
    student CE + distill_loss_factor * distill + ref_loss_factor * teacher CE (src/model.py:400)."""
    step = recipe.coconut.step_supervision
    weights = {"step": step.weight} if step.enabled else {}  # SIM-CoT's explain_loss_factor
    if recipe.method == "codi":
        return {"teacher": recipe.codi.ref_loss_factor, "distill": recipe.codi.distill_loss_factor, **weights}
    return weights
