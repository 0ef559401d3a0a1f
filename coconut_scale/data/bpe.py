"""A byte-level BPE tokenizer trained in-process, for models built from scratch (`model.tokenizer: train-bpe:N`).

GPT-2 style (byte-level pre-tokenizer and decoder), so any text round-trips, with one special token,
<|endoftext|>, serving as EOS, BOS and padding. The Coconut tokens are not added here: the caller adds them
(model.tokens.add_latent_tokens), as it does for a pretrained tokenizer.
"""

from __future__ import annotations

EOS = "<|endoftext|>"


def train_bpe_tokenizer(corpus: list[str], vocab_size: int):
    """A PreTrainedTokenizerFast with at most `vocab_size` tokens fit on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not corpus:
        raise ValueError("train_bpe_tokenizer: the corpus is empty")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so unseen text still encodes
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def bpe_corpus(records: list[dict]) -> list[str]:
    """One text per record, laid out as training sees it: question, the steps one per line, "### answer"."""
    return [r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"] for r in records]
