"""A run's data and tokenizer before training: the recipe's generated data set and its tokenizer (both collective:
rank 0 writes, every rank reads after a barrier)."""

from __future__ import annotations

from pathlib import Path

from coconut_scale import distributed as dist
from coconut_scale.config.model_spec import tokenizer_source


def recipe_tokenizer(recipe, bpe_dir: str | Path | None = None):
    """The recipe's tokenizer with the Coconut tokens (collective when it trains a BPE: rank 0 fits it into
    `bpe_dir`, default output_dir/tokenizer, unless it is there already; all load it)."""
    from coconut_scale.model.loading import load_tokenizer

    source = tokenizer_source(recipe)
    if source.bpe_vocab is None:
        return load_tokenizer(source.path, source.gguf_file)
    # `train-bpe:N`: a byte-level BPE of N tokens fit on the training file (small from-scratch models).
    from coconut_scale.data.bpe import bpe_corpus, train_bpe_tokenizer
    from coconut_scale.data.records import load_records

    target = Path(bpe_dir) if bpe_dir is not None else Path(recipe.output_dir) / "tokenizer"
    if dist.is_main() and not (target / "tokenizer.json").exists():
        corpus = bpe_corpus(load_records(recipe.data.train_file))
        train_bpe_tokenizer(corpus, source.bpe_vocab).save_pretrained(str(target))
    dist.barrier()
    return load_tokenizer(str(target))


def prepare_data(recipe, log=print) -> None:
    """Generate each data file the recipe's data.generate writes and that is missing (rank 0), then sync."""
    from coconut_scale.data.generate import generate_missing

    data = recipe.data
    if data.generate and dist.is_main():
        generate_missing(data.generate, data.train_file, data.val_file, log=log)
    dist.barrier()
