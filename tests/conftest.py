"""Suite-wide settings (DeepSpeed on the CPU without a GPU, no wandb), the GPU skip, and the fixtures every
folder may use. Helpers that test modules import live in plain modules: `coconut_scale.testing` (models,
tokenizers, batches) and tests/child_process.py (the environment of a child process)."""

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU DeepSpeed must find CUDA: a CPU accelerator would meet NCCL
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="session")
def train_losses():
    """`train_losses(output_dir)`: {global step: logged train loss} of the run's metrics.jsonl."""
    return _train_losses


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: torch's threads fight over the cores (one call up to 100x slower).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
