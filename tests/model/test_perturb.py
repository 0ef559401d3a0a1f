"""Each perturbation type has the statistics it promises, and changes outputs only when enabled."""

import math

import pytest
import torch

from coconut_scale.model import Coconut
from coconut_scale.model.perturb import NOISE_KINDS, Perturbation
from coconut_scale.testing import latent_batch, tiny_model
from coconut_scale.model.tokens import LatentTokens

D = 4096  # wide vectors make the sample statistics tight


@pytest.fixture
def hidden():
    return torch.randn(64, D, generator=torch.Generator().manual_seed(1234)) * 3.0


def test_gaussian_has_absolute_sigma(hidden):
    noise = Perturbation("gaussian", 0.5)(hidden, 0) - hidden
    assert abs(noise.std().item() - 0.5) < 0.01
    assert abs(noise.mean().item()) < 0.01


def test_gaussian_scaled_norm_ratio(hidden):
    noise = Perturbation("gaussian_scaled", 0.3)(hidden, 0) - hidden
    ratio = noise.norm(dim=-1) / hidden.norm(dim=-1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.3), atol=0.02)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_snr_in_db(hidden, snr_db):
    noise = Perturbation("snr", snr_db)(hidden, 0) - hidden
    measured = 10 * torch.log10(hidden.pow(2).mean(-1) / noise.pow(2).mean(-1))
    assert torch.allclose(measured, torch.full_like(measured, snr_db), atol=0.3)


def test_uniform_bounds_and_variance(hidden):
    noise = Perturbation("uniform", 0.2)(hidden, 0) - hidden
    assert noise.abs().max().item() <= 0.2 + 1e-6
    assert abs(noise.var().item() - 0.2**2 / 3) < 1e-3


def test_orthogonal_is_perpendicular_with_exact_norm(hidden):
    noise = Perturbation("orthogonal", 0.5)(hidden, 0) - hidden
    cos = torch.nn.functional.cosine_similarity(noise, hidden, dim=-1)
    assert cos.abs().max().item() < 1e-4
    torch.testing.assert_close(noise.norm(dim=-1), 0.5 * hidden.norm(dim=-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [0.25, -0.25])
def test_targeted_along_or_against(hidden, scale):
    noise = Perturbation("targeted", scale)(hidden, 0) - hidden
    cos = torch.nn.functional.cosine_similarity(noise, hidden, dim=-1)
    assert torch.allclose(cos, torch.full_like(cos, math.copysign(1.0, scale)), atol=1e-5)
    torch.testing.assert_close(noise.norm(dim=-1), abs(scale) * hidden.norm(dim=-1), rtol=1e-4, atol=1e-4)


def test_seeded_reproducible_and_pass_selective(hidden):
    p = Perturbation("gaussian", 1.0, passes=(1,), seed=3)
    assert torch.equal(p(hidden, 1), p(hidden, 1))
    assert not torch.equal(p(hidden, 1), Perturbation("gaussian", 1.0, passes=(1,), seed=4)(hidden, 1))
    assert torch.equal(p(hidden, 0), hidden)  # pass 0 not selected


def test_bad_kind_and_scale_are_rejected():
    with pytest.raises(ValueError, match="unknown perturbation kind 'pink'"):
        Perturbation("pink", 1.0)
    with pytest.raises(ValueError, match="scale >= 0"):
        Perturbation("gaussian", -1.0)


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_changes_outputs_only_when_enabled(kind):
    model, tok = tiny_model("llama")
    t = LatentTokens.from_tokenizer(tok)
    coconut = Coconut(model, t.latent_id, t.start_id, t.end_id, t.eos_id)
    ids, mask, labels, pos = latent_batch(t, [3, 2], [5, 6], seed=1)
    clean = coconut(ids, mask, labels, pos, return_logits=True).logits
    assert torch.equal(coconut(ids, mask, labels, pos, return_logits=True).logits, clean)  # off: deterministic, untouched
    scale = {"snr": 0.0, "targeted": -0.9}.get(kind, 2.0)
    coconut.perturbation = Perturbation(kind, scale, passes=(1,))
    noisy = coconut(ids, mask, labels, pos, return_logits=True).logits
    first_latent = int((ids[0] == t.latent_id).nonzero()[0])
    # Positions up to and including the first latent are untouched (pass 0 not perturbed) ...
    torch.testing.assert_close(noisy[:, : first_latent + 1], clean[:, : first_latent + 1])
    # ... the second latent's fed-back state was perturbed, so later positions change.
    assert not torch.allclose(noisy[:, first_latent + 2 :], clean[:, first_latent + 2 :])
    coconut.perturbation = None
    assert torch.equal(coconut(ids, mask, labels, pos, return_logits=True).logits, clean)


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_keyed_noise_follows_the_example_not_its_row_or_batch(kind):
    """With row keys, an example draws the same noise in any batch position, and two examples differ."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 32, generator=g)
    p = Perturbation(kind, -0.5 if kind == "targeted" else 0.7, seed=4)
    together = p(h, 1, row_keys=[11, 22, 33]) - h
    reordered = p(h[[2, 0]], 1, row_keys=[33, 11]) - h[[2, 0]]
    torch.testing.assert_close(reordered, together[[2, 0]])
    if kind != "targeted":  # targeted noise is deterministic (scale * h): nothing random to key
        same_state = p(h[[0, 0]], 1, row_keys=[11, 22]) - h[[0, 0]]
        assert not torch.allclose(same_state[0], same_state[1])
        assert not torch.allclose(p(h[:1], 2, row_keys=[11]), p(h[:1], 1, row_keys=[11]))  # per latent pass too
