"""The exact module that trains, from a `ModelSpec`: one builder for the trainer, `check --measure`, notebooks.

    spec = model_spec(recipe)                      # config/model_spec.py: the recipe resolved once
    model = build_training_model(spec, tokenizer)  # a Coconut wrapper, ready for DeepSpeed (or plain PyTorch)

The builder does, in this order (the order fixes which random numbers each part draws, so it is part of the
result): load the base model from its source (weights, a GGUF, or random from a config, seeded), add the
Coconut token rows, wrap it in `Coconut`, switch latent feedback, wrap each decoder layer in latent-safe
checkpointing, add the method parts (SIM-CoT's step decoder: loaded, checkpointed, a `StepSupervision` child;
CODI's projection: a `CodiPart` child), then LoRA on the base and on a separate decoder.

Under ZeRO-3 the caller builds inside DeepSpeed's context: an `HfDeepSpeedConfig` alive while the models load (so
each rank materialises only its partition) and a `gather(params)` context that makes partitioned embedding rows
writable (train/strategy.py provides both). Nothing here reads a recipe or imports DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

from torch import nn

from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
from coconut_scale.model.codi import CodiPart, CodiSpec
from coconut_scale.model.coconut import Coconut
from coconut_scale.model.loading import DTYPES, ModelSource, build_coconut, load_source
from coconut_scale.model.step_supervision import StepSupervision


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...] | None = None  # None: model/shapes.py default_lora_targets(model_type)


@dataclass(frozen=True)
class StepSupervisionSpec:
    """SIM-CoT's step decoder (model/step_supervision.py): `decoder` None decodes with the base model itself."""

    decoder: ModelSource | None
    c_thought: int
    layout: str = "coconut"  # "codi": SIM-CoT's CODI variant (its decoder is fully trained, never LoRA-wrapped)


@dataclass(frozen=True)
class ModelSpec:
    source: ModelSource
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the parameters' dtype
    attn_implementation: str = "sdpa"
    seed: int = 0  # seeds a from_config model's random init (the same on every rank)
    init_text: str = "<<"  # the Coconut token rows start from this text's embedding
    gradient_checkpointing: bool = True  # latent-safe, per decoder layer (model/activation_checkpointing.py)
    feedback: bool = True  # hidden states into the latent positions (False: pause-as-thought)
    lora: LoraSpec | None = None
    step_supervision: StepSupervisionSpec | None = None
    codi: CodiSpec | None = None  # method codi: CODI's projection, teacher pass and distillation (model/codi.py)


def _load(source: ModelSource, spec: ModelSpec, vocab_size: int) -> nn.Module:
    return load_source(source, dtype=spec.dtype, attn_implementation=spec.attn_implementation, vocab_size=vocab_size,
                       seed=spec.seed)


def build_training_model(spec: ModelSpec, tokenizer,
                         gather: Callable[[list], ContextManager] | None = None) -> Coconut:
    """The Coconut wrapper that trains: base model, token rows, checkpointing, method parts, LoRA (module doc).
    `tokenizer` already holds the Coconut tokens; `gather` as in model/tokens.resize_and_init_embeddings."""
    base = _load(spec.source, spec, len(tokenizer))
    model = build_coconut(base, tokenizer, init_text=spec.init_text, gather=gather)
    model.feedback = spec.feedback
    if spec.gradient_checkpointing:
        enable_latent_safe_checkpointing(base)
    step = spec.step_supervision
    part = None
    if step is not None:
        # Not resized for the Coconut tokens: it never reads one (its inputs come from the base's embedding table).
        decoder = _load(step.decoder, spec, len(tokenizer)) if step.decoder is not None else None
        if decoder is not None and spec.gradient_checkpointing:
            enable_latent_safe_checkpointing(decoder)
        part = model.add_part(StepSupervision(decoder, step.c_thought, layout=step.layout))
    if spec.codi is not None:
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        model.add_part(CodiPart(config.hidden_size, spec.codi, dtype=DTYPES[spec.dtype]))
        model.suppressed_token_ids = (model.end_latent_id,)  # their test.py never emits eot
    if spec.lora is not None:
        from coconut_scale.model.lora import apply_lora, wrap_with_lora

        apply_lora(model, spec.lora, tokenizer, dtype=DTYPES[spec.dtype])
        if part is not None and part.decoder is not None and part.layout != "codi":
            part.decoder = wrap_with_lora(part.decoder, spec.lora)
    return model
