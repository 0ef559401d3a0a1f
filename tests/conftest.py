import json
import os
from pathlib import Path

import pytest
import torch

from coconut_scale.data.collate import LatentAlignedCollator

if not torch.cuda.is_available():  # on a GPU DeepSpeed must find CUDA: a CPU accelerator would meet NCCL
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra) -> dict:
    """The environment of a training/eval subprocess: DeepSpeed on CPU, one thread, no wandb, unbuffered output,
    the checkout importable (scripts run by path do not see it unless the package is installed), and none of a
    launcher's rank variables leaking in from the calling shell."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_losses(out: Path) -> dict[int, float]:
    """{global step: logged train loss} of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in rows if r["kind"] == "train"}


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
    """A collated batch: question, start, n latents, end, answer (the collator aligns the first latents).
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
    batch = LatentAlignedCollator(tokens.pad_id, tokens.latent_id)(
        [{"input_ids": r, "labels": lab} for r, lab in zip(rows, label_rows)]
    )
    return batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]


def break_embedding_ties(model, scale=0.05, seed=1):
    """The three new token rows are copies of one row; tied lm_heads then give exact logit ties, and
    greedy argmax between equal logits depends on rounding. Tests comparing token streams jitter them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w.add_((torch.randn(w.shape, generator=g) * scale).to(w.device, w.dtype))
