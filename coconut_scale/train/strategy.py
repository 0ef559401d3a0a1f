"""Build the DeepSpeed engine around the Coconut wrapper: loading discipline for ZeRO-3, optimizer, schedule.

Order matters under ZeRO-3 (see shared FACTS): an `HfDeepSpeedConfig` must be alive *before*
`from_pretrained`/`from_config`, so each rank materialises only its partition; the new token rows are
written inside `GatheredParameters(modifier_rank=0)`; the *wrapper* (not the HF model) is the engine's
module, so ZeRO-3 sees one forward per step and its prefetch trace stays valid across the latent passes.

The optimizer (AdamW) and the LR schedule are built here from the recipe and handed to DeepSpeed as client
objects, so that the stage-boundary reset (the paper's setting) is a plain state clear.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch

from coconut_scale import distributed as dist
from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
from coconut_scale.model.loading import build_coconut, load_causal_lm
from coconut_scale.model import Coconut


@dataclass
class EngineBundle:
    engine: object  # deepspeed.DeepSpeedEngine
    model: Coconut
    ds_config: dict
    hf_ds_config: object | None  # kept alive: transformers consults it while ZeRO-3 is active
    lora: bool
    schedule_steps: int


def hidden_size_of(recipe) -> int:
    from coconut_scale.model.shapes import shape_for

    if recipe.model.from_config:
        cfg = recipe.model.from_config
        return int(cfg.get("hidden_size") or cfg.get("n_embd"))
    shape = shape_for(recipe.model.name_or_path)
    if shape:
        return int(shape.get("hidden_size") or shape.get("n_embd"))
    from transformers import AutoConfig

    source = recipe.checkpoint.init_from or recipe.model.name_or_path
    kwargs = {"gguf_file": recipe.model.gguf_file} if recipe.model.gguf_file and not recipe.checkpoint.init_from else {}
    from coconut_scale.model.loading import resolve_source

    config = AutoConfig.from_pretrained(resolve_source(source), **kwargs)
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def lr_lambda(scheduler: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant" or total <= warmup:
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _zero3_gather(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def build_engine(recipe, ds_config: dict, tokenizer, schedule_steps: int, log=print) -> EngineBundle:
    import deepspeed

    ds_config = copy.deepcopy(ds_config)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    hf_ds_config = None
    if zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)

    source = recipe.checkpoint.init_from or recipe.model.name_or_path
    base = load_causal_lm(
        source,
        dtype=recipe.model.dtype,
        attn_implementation=recipe.model.attn_implementation,
        gguf_file=None if recipe.checkpoint.init_from else recipe.model.gguf_file,
        from_config=None if recipe.checkpoint.init_from else recipe.model.from_config,
        vocab_size=len(tokenizer),
        seed=recipe.seed,
    )
    gather = _zero3_gather if zero_stage == 3 else (lambda params: contextlib.nullcontext())
    model = build_coconut(base, tokenizer, init_text=recipe.model.init_text, gather=gather)
    model.feedback = recipe.coconut.mode == "coconut"
    if recipe.model.gradient_checkpointing:
        enable_latent_safe_checkpointing(base)

    lora = bool(recipe.lora.enabled)
    if lora:
        from coconut_scale.model.lora import apply_lora

        apply_lora(model, recipe, tokenizer)

    params = [p for p in model.parameters() if p.requires_grad]
    # Client optimizer: fused on CUDA; foreach elsewhere. CPU-offloaded optimizers are DeepSpeed's own (CPUAdam).
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    optimizer = None
    if not offload:
        ds_config.pop("optimizer", None)
        ds_config["zero_allow_untested_optimizer"] = True
        optimizer = torch.optim.AdamW(
            params, lr=recipe.optim.lr, betas=tuple(recipe.optim.betas), eps=recipe.optim.eps,
            weight_decay=recipe.optim.weight_decay, fused=torch.cuda.is_available() or None,
        )
    ds_config.pop("scheduler", None)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds_config
    )
    engine.lr_scheduler = _new_scheduler(engine, recipe, schedule_steps)
    n_total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    log(f"model: {n_total / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable; ZeRO stage {zero_stage}; "
        f"checkpointing {'on' if recipe.model.gradient_checkpointing else 'off'}; "
        f"attention {base.config._attn_implementation}")
    return EngineBundle(engine, model, ds_config, hf_ds_config, lora, schedule_steps)


def _innermost_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _new_scheduler(engine, recipe, schedule_steps: int):
    opt = _innermost_optimizer(engine)
    for group in opt.param_groups:
        group["lr"] = group.get("initial_lr", recipe.optim.lr)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(recipe.optim.scheduler, recipe.optim.warmup_steps, schedule_steps)
    )


def reset_optimizer(bundle: EngineBundle, recipe) -> None:
    """Fresh Adam moments and a restarted LR schedule (the paper resets at every stage boundary)."""
    opt = _innermost_optimizer(bundle.engine)
    opt.state.clear()
    bundle.engine.lr_scheduler = _new_scheduler(bundle.engine, recipe, bundle.schedule_steps)


def current_lr(engine) -> float:
    return float(_innermost_optimizer(engine).param_groups[0]["lr"])


def global_grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def dist_device():
    return dist.device()
