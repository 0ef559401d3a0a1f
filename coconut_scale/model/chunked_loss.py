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

Where the head is a plain `nn.Linear` that nothing hooks and whose weight ZeRO-3 has not partitioned (one
process, ZeRO 0-2, LoRA that leaves the head alone), the module call buys nothing, so the loss and its
gradients come from one fused sweep instead: Liger's kernel where it is installed and the tensors are on CUDA,
else `FusedLinearCrossEntropy` below, which computes each chunk's gradients in forward (softmax minus one-hot
needs no autograd) and keeps them, so backward recomputes nothing: the lm_head costs what it costs without
chunking.
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


def _chunk_weighted_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (nll * weights).sum()


def _fusable(head: nn.Module) -> bool:
    """A head whose weight can be used directly: a plain Linear, unhooked (LoRA's tied-head hook, ZeRO-3's
    gathering), with a weight ZeRO-3 has not partitioned (such a weight is empty outside its module's forward)."""
    return (type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and not hasattr(head.weight, "ds_id"))


def _liger_loss(head: nn.Module, hidden: torch.Tensor):
    """Liger's fused loss when it can stand in for the chunk loop (reduction "sum"), else None."""
    if not hidden.is_cuda:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed CE of `hidden @ weight.T + bias` against `labels`, scaled by 1/count, from chunks of rows.

    Forward computes, chunk by chunk, the loss and its gradients (d logits = softmax - one-hot), so no logits
    outlive their chunk and backward only scales what forward kept: d hidden ([N, h], small) and d weight
    ([V, h], accumulated in fp32 across chunks, as one full matmul would accumulate it).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, count, num_chunks):
        want = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if want[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and want[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        scale = 1.0 / count.float()
        wants_grads = grad_hidden is not None or grad_weight is not None or grad_bias is not None
        grad_hidden_chunks = grad_hidden.tensor_split(num_chunks) if grad_hidden is not None else [None] * num_chunks
        for h, y, grad_h in zip(hidden.tensor_split(num_chunks), labels.tensor_split(num_chunks), grad_hidden_chunks):
            logits = F.linear(h, weight, bias).float()
            keep = y != IGNORE_INDEX
            target = y.clamp_min(0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total = total + ((lse - logits.gather(1, target)[:, 0]) * keep).sum()
            if not wants_grads:
                continue
            grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place: the chunk's only [n, V] buffer
            grad_logits.scatter_add_(1, target, torch.full_like(lse[:, None], -1.0))
            grad_logits = grad_logits.mul_((keep * scale)[:, None]).to(h.dtype)
            if grad_h is not None:
                torch.matmul(grad_logits, weight, out=grad_h)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().float(), h.float())
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype),
                None, None, None)


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
    if _fusable(head):
        liger = _liger_loss(head, flat_hidden)
        if liger is not None:
            return liger(head.weight, flat_hidden, flat_labels, head.bias) / count
        return FusedLinearCrossEntropy.apply(flat_hidden, head.weight, head.bias, flat_labels, count, num_chunks)
    total = flat_hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(flat_hidden.tensor_split(num_chunks), flat_labels.tensor_split(num_chunks)):
        # Chunks may be empty (fewer tokens than chunks): they still call the head, so every rank calls it
        # num_chunks times.
        total = total + checkpoint(_chunk_nll_sum, head, h, y, use_reentrant=False)
    return total / count


def chunked_weighted_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, head: nn.Module,
                                   num_chunks: int = DEFAULT_LOSS_CHUNKS) -> torch.Tensor:
    """sum_i weights[i] * CE(head(hidden[i]), labels[i]) over the i whose label is not -100; `hidden` [N, h],
    `labels` and `weights` [N] (no shift). The head is always called as a module, in `num_chunks` checkpointed
    calls (every rank the same number), so one chunk's logits exist at a time and backward recomputes them."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y, w in zip(hidden.tensor_split(num_chunks), labels.tensor_split(num_chunks),
                       weights.tensor_split(num_chunks)):
        total = total + checkpoint(_chunk_weighted_nll_sum, head, h, y, w, use_reentrant=False)
    return total
