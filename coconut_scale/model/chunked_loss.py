"""Next-token cross-entropy from the last hidden states, without ever holding [B, T, V] logits.

The full logits of a training batch are the largest activation of the step at large vocabularies (Llama-3:
128256, Qwen3: 151936), in fp32 for the loss, and their gradient as large again. Here the shifted tokens are cut
into a fixed number of chunks; each chunk's logits come from calling the output-embedding *module* inside a
non-reentrant `torch.utils.checkpoint`, so only one chunk's logits exist at a time, forward and backward, and
backward recomputes that product instead of keeping it. Calling the module (not its weight) matters:

  - under ZeRO-3 the lm_head weight is partitioned and gathered only while its module runs; the recompute in
    backward runs the module again, so it re-gathers;
  - LoRA's output-side hook on a tied GPT-2 head (model/lora.py) is a forward hook of that module, so it stays
    in effect for every chunk.

The number of chunks is a constant, not derived from the batch width: under ZeRO-3 every rank must call the
lm_head module the same number of times, and ranks see batches of different widths.

Where Liger's fused linear cross-entropy is installed and usable (a CUDA tensor, a plain `nn.Linear` head
without hooks, a weight that ZeRO-3 has not partitioned), it replaces the loop: one fused kernel, no logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from coconut_scale.model.tokens import IGNORE_INDEX

DEFAULT_LOSS_CHUNKS = 8


def _chunk_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _liger_loss(head: nn.Module, hidden: torch.Tensor):
    """Liger's fused loss when it can stand in for the chunk loop (reduction "sum"), else None."""
    if not hidden.is_cuda or type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if hasattr(head.weight, "ds_id"):  # a ZeRO-3 parameter: empty outside its module's forward
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_shifted_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                                  num_chunks: int = DEFAULT_LOSS_CHUNKS) -> torch.Tensor:
    """Mean CE of `head(hidden[:, t])` against `labels[:, t + 1]` over labels that are not -100 (0 if none).

    Equals `shifted_cross_entropy(head(hidden), labels)` (model/coconut.py) up to float summation order. No
    host sync: the token count stays on the device.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    flat_labels = labels[:, 1:].reshape(-1)
    count = (flat_labels != IGNORE_INDEX).sum().clamp_min(1)
    liger = _liger_loss(head, flat_hidden)
    if liger is not None:
        return liger(head.weight, flat_hidden, flat_labels, head.bias) / count
    total = flat_hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(flat_hidden.tensor_split(num_chunks), flat_labels.tensor_split(num_chunks)):
        # Chunks may be empty (fewer tokens than chunks): they still call the head, so every rank calls it
        # num_chunks times.
        total = total + checkpoint(_chunk_nll_sum, head, h, y, use_reentrant=False)
    return total / count
