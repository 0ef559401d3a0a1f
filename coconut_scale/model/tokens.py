"""The three Coconut special tokens, and adding them to any HF tokenizer + causal LM.

The model wrapper and the data pipeline only ever see the integer ids, bundled in `LatentTokens`.
Embedding-row initialisation takes a `gather` context manager so that the caller (the training engine)
can make ZeRO-3-partitioned rows visible; this module knows nothing of DeepSpeed.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager

import torch

START_LATENT = "<|start-latent|>"
LATENT = "<|latent|>"
END_LATENT = "<|end-latent|>"
SPECIAL_TOKENS = (START_LATENT, LATENT, END_LATENT)
IGNORE_INDEX = -100  # label of positions without a loss (question, markers, latents, padding): torch's default

# The official code copies the row of "<<" into the new tokens. Any text works here: when it is more than
# one token in this tokenizer, the mean of its rows is used, so the default exists in every tokenizer.
DEFAULT_INIT_TEXT = "<<"


@dataclass(frozen=True)
class LatentTokens:
    """Token ids the wrapper and the data pipeline need."""

    start_id: int
    latent_id: int
    end_id: int
    eos_id: int
    pad_id: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "LatentTokens":
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None or (unk is not None and i == unk)]
        if missing:
            raise ValueError(f"tokenizer lacks the Coconut tokens {missing}; call add_latent_tokens() first")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; Coconut answers end with EOS")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(start_id=ids[0], latent_id=ids[1], end_id=ids[2], eos_id=tokenizer.eos_token_id, pad_id=pad)


def add_latent_tokens(tokenizer) -> list[int]:
    """Add the three special tokens (idempotent); returns their ids in SPECIAL_TOKENS order."""
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often lack a pad token; EOS is the conventional stand-in and pad
        # positions are always masked out of attention and labelled -100.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))


def init_text_ids(tokenizer, init_text: str = DEFAULT_INIT_TEXT) -> list[int]:
    ids = tokenizer.encode(init_text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"embedding init text {init_text!r} tokenizes to nothing")
    return ids


def resize_and_init_embeddings(
    model,
    tokenizer,
    init_text: str = DEFAULT_INIT_TEXT,
    gather: Callable[[list[torch.nn.Parameter]], ContextManager] | None = None,
) -> None:
    """Resize the model to the tokenizer and copy the init text's row(s) into the new tokens' rows.

    Input embeddings always; the lm_head too when it is not tied to them. `gather(params)` must return a
    context in which those parameters are complete and writes persist (ZeRO-3: GatheredParameters with
    modifier_rank=0); default: no-op.
    """
    new_ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    source_ids = init_text_ids(tokenizer, init_text)
    if any(i in new_ids for i in source_ids):
        raise ValueError(f"embedding init text {init_text!r} maps onto a Coconut token itself")
    # The new rows are overwritten below, so skip transformers' default init of them (a d x d covariance
    # of the whole embedding and a multivariate-normal draw: d = 4096 on Llama 8B, for nothing).
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gather = gather or (lambda params: contextlib.nullcontext())
    in_emb = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    targets = [in_emb]
    # Tied means the same Parameter object (how transformers ties). Storage addresses cannot tell: a ZeRO-3
    # placeholder, a meta or a fake tensor has none (0 for all of them, so an untied head would look tied).
    if out_layer is not None and out_layer.weight is not in_emb:
        targets.append(out_layer.weight)
    with gather(targets), torch.no_grad():
        for weight in targets:
            if weight.numel() == 0:  # partitioned and not gathered on this rank
                continue
            row = weight[source_ids].mean(dim=0)
            for token_id in new_ids:
                weight[token_id] = row
