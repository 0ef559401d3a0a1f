"""Chunked cross-entropy (coconut_scale/model/chunked_loss.py) against the plain loss on a CUDA GPU.

Two paths: the checkpointed chunk loop (forced by a forward hook on the head, which the fused path refuses),
and the fused sweep the function picks for a plain head: Liger's kernel when `liger_kernel` imports, else the
torch `FusedLinearCrossEntropy`.
"""

import pytest
import torch
from torch import nn

from coconut_scale.model.coconut import shifted_cross_entropy
from coconut_scale.model.tokens import IGNORE_INDEX

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


def _chunked():
    try:
        from coconut_scale.model.chunked_loss import chunked_shifted_cross_entropy
    except ImportError as e:  # written in parallel with this kit; skip until it lands
        pytest.skip(f"coconut_scale.model.chunked_loss.chunked_shifted_cross_entropy is not there yet: {e}")
    return chunked_shifted_cross_entropy


def _problem(dtype, seed=0, batch=3, seq=37, hidden=64, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * hidden**-0.5)
    head = head.to(DEVICE, dtype)
    hidden_states = torch.randn(batch, seq, hidden, generator=g).to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, : seq // 3] = IGNORE_INDEX  # the question part of a Coconut row carries no labels
    labels[0, -5:] = IGNORE_INDEX  # right padding
    return head, hidden_states, labels.to(DEVICE)


def _loss_and_grads(loss, head, hidden_states):
    gh, gw = torch.autograd.grad(loss, [hidden_states, head.weight])
    return loss.detach().float(), gh.float(), gw.float()


@pytest.mark.parametrize("path", ["chunk_loop", "fused"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_chunks", [1, 4, 200])  # 200 > tokens: empty chunks still call the head
def test_chunked_loss_equals_plain_loss(path, dtype, rtol, num_chunks):
    chunked = _chunked()
    head, hidden_states, labels = _problem(dtype)
    want = _loss_and_grads(shifted_cross_entropy(head(hidden_states), labels), head, hidden_states)
    hook = head.register_forward_hook(lambda *_: None) if path == "chunk_loop" else None
    got = _loss_and_grads(chunked(hidden_states, labels, head, num_chunks=num_chunks), head, hidden_states)
    if hook is not None:
        hook.remove()
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()), msg=lambda m: f"{name}: {m}")


def test_chunked_loss_without_labels_is_zero_and_keeps_the_graph():
    chunked = _chunked()
    head, hidden_states, labels = _problem(torch.float32)
    loss = chunked(hidden_states, torch.full_like(labels, IGNORE_INDEX), head)
    assert float(loss) == 0.0
    loss.backward()  # no error: the head stays in the graph with zero gradient
    assert hidden_states.grad is not None and float(hidden_states.grad.abs().max()) == 0.0
