import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("COCONUT_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def latent_batch(tokens, latent_counts, lengths, seed=0, vocab=300, answer_len=4):
    """A collated-style batch: question, start, n latents, end, answer; first latents aligned by left padding.

    Rows without latents are not shifted (right-padded), as the collator does.
    Returns input_ids, attention_mask, labels, position_ids.
    """
    g = torch.Generator().manual_seed(seed)
    rows, label_rows = [], []
    for n, q_len in zip(latent_counts, lengths):
        q = torch.randint(0, vocab, (q_len,), generator=g).tolist()
        a = torch.randint(0, vocab, (answer_len,), generator=g).tolist() + [tokens.eos_id]
        if n:
            seq = q + [tokens.start_id] + [tokens.latent_id] * n + [tokens.end_id] + a
            lab = [-100] * (q_len + n + 2) + a
        else:
            seq = q + a
            lab = [-100] * q_len + a
        rows.append(seq)
        label_rows.append(lab)
    firsts = [r.index(tokens.latent_id) for r in rows if tokens.latent_id in r]
    align = max(firsts) if firsts else 0
    shifts = [align - r.index(tokens.latent_id) if tokens.latent_id in r else 0 for r in rows]
    width = max(s + len(r) for s, r in zip(shifts, rows))
    ids = torch.full((len(rows), width), tokens.pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, r, lab) in enumerate(zip(shifts, rows, label_rows)):
        ids[i, s : s + len(r)] = torch.tensor(r)
        mask[i, s : s + len(r)] = 1
        labels[i, s : s + len(r)] = torch.tensor(lab)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, labels, positions


def break_embedding_ties(model, scale=0.05, seed=1):
    """The three new token rows are copies of one row; tied lm_heads then give exact logit ties, and
    greedy argmax between equal logits depends on rounding. Tests comparing token streams jitter them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w.add_(torch.randn(w.shape, generator=g) * scale)
