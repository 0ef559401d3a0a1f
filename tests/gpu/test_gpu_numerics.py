"""Numerics on a CUDA GPU: bf16 against the fp32 reference, checkpointing, batched generation, attention kernels.

Marked `gpu`: tests/conftest.py skips them without CUDA. Tiny random models (coconut_scale.testing), so the whole
file takes seconds; benchmarks/gpu_validate.py runs it on the GPU machine. bf16 tolerances follow the rule of
thumb for bf16 operands (an 8-bit mantissa: relative errors between 1e-3 and 1e-2), loosened for the
accumulation through two layers and seven passes.
"""

import copy

import pytest
import torch

from coconut_scale.data.collate import left_pad_for_generation
from coconut_scale.model.activation_checkpointing import enable_latent_safe_checkpointing
from coconut_scale.model.coconut import Coconut
from coconut_scale.model.reference import reference_forward
from coconut_scale.model.tokens import LatentTokens
from coconut_scale.testing import break_embedding_ties, latent_batch, tiny_model

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
ARCHS = ["gpt2", "llama", "qwen3"]
# Rows with 0..6 latents (stage 3 at c_thought 2 has 6) and unequal question lengths.
LATENTS, LENGTHS = [0, 2, 6, 3], [7, 4, 9, 5]
BF16_LOSS_RTOL = 2e-2
BF16_GRAD_REL = 5e-2  # ||g - g_ref|| / ||g_ref|| over all parameters


def _coconut(arch, dtype=torch.float32, attn="sdpa", seed=0):
    model, tok = tiny_model(arch, seed=seed, attn=attn)
    tokens = LatentTokens.from_tokenizer(tok)
    wrapper = Coconut(model, tokens.latent_id, tokens.start_id, tokens.end_id, tokens.eos_id)
    return wrapper.to(DEVICE, dtype), tokens


def _batch(tokens, seed=0, latents=LATENTS, lengths=LENGTHS):
    return [t.to(DEVICE) for t in latent_batch(tokens, latents, lengths, seed=seed)]


def _flat_grads(module, loss) -> torch.Tensor:
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten() for g, p in zip(grads, params)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_forward_backward_matches_fp32_reference(arch):
    ref_model, tokens = _coconut(arch)
    ids, mask, labels, pos = _batch(tokens)
    ref_loss, _ = reference_forward(ref_model.base_causallm, ids, mask, labels, pos, tokens.latent_id)
    ref_grads = _flat_grads(ref_model.base_causallm, ref_loss)

    bf16 = copy.deepcopy(ref_model).to(torch.bfloat16)
    out = bf16(ids, mask, labels, pos)
    grads = _flat_grads(bf16.base_causallm, out.loss)

    assert out.loss.dtype == torch.float32  # the loss is taken in fp32 from bf16 logits
    assert torch.isfinite(out.loss) and torch.isfinite(grads).all()
    assert abs(out.loss.item() - float(ref_loss)) <= BF16_LOSS_RTOL * abs(float(ref_loss))
    assert _rel(grads, ref_grads) < BF16_GRAD_REL


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointing_on_and_off_agree_on_cuda(arch, dtype):
    model, tokens = _coconut(arch, dtype=dtype)
    model.train()
    ids, mask, labels, pos = _batch(tokens, seed=3)
    plain_out = model(ids, mask, labels, pos)
    plain = _flat_grads(model.base_causallm, plain_out.loss)
    enable_latent_safe_checkpointing(model.base_causallm)
    ckpt_out = model(ids, mask, labels, pos)
    ckpt = _flat_grads(model.base_causallm, ckpt_out.loss)
    # The forward runs the same kernels on the same inputs: bit for bit. The backward differs only by the
    # recompute, which is exact, up to the atomics some CUDA backward kernels accumulate with.
    assert torch.equal(ckpt_out.loss, plain_out.loss)
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-3)


def _left_pad(rows, pad_id):
    ids, mask, _ = left_pad_for_generation(rows, pad_id)
    return ids.to(DEVICE), mask.to(DEVICE)


def _is_near_tie(model, prefix: list[int], a: int, b: int) -> bool:
    """True when tokens a and b are within bf16 rounding of each other after `prefix` (a legitimate flip)."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix], device=DEVICE)).logits[0, -1].float()
    return float((logits[a] - logits[b]).abs()) <= 0.02 * float(logits.abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_generation_equals_single_rows_bf16(arch):
    model, tokens = _coconut(arch, dtype=torch.float32, seed=3)
    break_embedding_ties(model.base_causallm)
    model = model.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(11)
    spec = [(5, 6), (9, 6), (3, 6), (12, 4), (7, 0), (4, 2)]
    rows = []
    for q_len, n in spec:
        q = torch.randint(0, 300, (q_len,), generator=g).tolist()
        rows.append(q + ([tokens.start_id] + [tokens.latent_id] * n + [tokens.end_id] if n else []))
    ids, mask = _left_pad(rows, tokens.pad_id)
    new = 12
    batched = model.generate(ids, mask, max_new_tokens=new)[:, ids.shape[1]:].tolist()
    compared = 0
    for i, row in enumerate(rows):
        single = model.generate(torch.tensor([row], device=DEVICE), max_new_tokens=new)[0, len(row):].tolist()
        for k, (s, b) in enumerate(zip(single, batched[i])):
            if s != b:
                # Padding changes kernel shapes, so bf16 sums round differently: only a near-tie may flip.
                assert _is_near_tie(model, row + single[:k], s, b), (i, k, single, batched[i])
                break
            compared += 1
        else:
            assert all(t == tokens.eos_id for t in batched[i][len(single):])
    assert compared >= len(rows) * new // 2  # most tokens were really compared, not excused as ties


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, BF16_LOSS_RTOL)])
def test_sdpa_and_eager_losses_agree(arch, dtype, rtol):
    sdpa, tokens = _coconut(arch, dtype=dtype, attn="sdpa")
    eager, _ = _coconut(arch, dtype=dtype, attn="eager")
    ids, mask, labels, pos = _batch(tokens, seed=5)
    with torch.no_grad():
        a = float(sdpa(ids, mask, labels, pos).loss)
        b = float(eager(ids, mask, labels, pos).loss)
    assert abs(a - b) <= rtol * abs(b)


def test_flash_attention_2_matches_sdpa():
    pytest.importorskip("flash_attn", reason="flash_attn is not installed (source-only on PyPI; sdpa is the default)")
    sdpa, tokens = _coconut("llama", dtype=torch.bfloat16, attn="sdpa")
    flash, _ = _coconut("llama", dtype=torch.bfloat16, attn="flash_attention_2")
    ids, mask, labels, pos = _batch(tokens, seed=6)
    a_out = sdpa(ids, mask, labels, pos)
    b_out = flash(ids, mask, labels, pos)
    assert abs(a_out.loss.item() - b_out.loss.item()) <= BF16_LOSS_RTOL * abs(a_out.loss.item())
    assert _rel(_flat_grads(flash.base_causallm, b_out.loss), _flat_grads(sdpa.base_causallm, a_out.loss)) < BF16_GRAD_REL
