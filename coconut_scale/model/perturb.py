"""Perturbations of continuous thoughts, for robustness studies.

A `Perturbation` adds noise to the hidden state that is fed back as a latent's input embedding, at chosen
latent passes (0-based index of the latent within a row: pass k fills every row's k-th latent). Off by
default; when off the wrapper never calls into this module, so it costs nothing.

Noise is drawn from dedicated CPU generators, never the global RNG. Given `row_keys` (the wrapper passes a
hash of each example's tokens), every row has its own generator seeded by (`seed`, pass index, key): an
example gets the same noise whatever batch, batch size or rank it lands in, and different examples get
independent draws. Without keys, one generator per call seeded by (`seed`, pass index) draws for all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

NoiseKind = Literal["gaussian", "gaussian_scaled", "snr", "uniform", "orthogonal", "targeted"]
NOISE_KINDS: tuple[str, ...] = ("gaussian", "gaussian_scaled", "snr", "uniform", "orthogonal", "targeted")


@dataclass(frozen=True)
class Perturbation:
    """What to add to the fed-back hidden state h (one vector per row, dimension d).

    kind / meaning of `scale`:
      gaussian         absolute sigma: h + scale * N(0, I)
      gaussian_scaled  relative: noise norm ~= scale * |h|  (sigma = scale * |h| / sqrt(d))
      snr              target signal-to-noise ratio in dB: mean(h^2) / mean(noise^2) = 10^(scale/10)
      uniform          h + U(-scale, scale) per coordinate
      orthogonal       noise perpendicular to h with norm exactly scale * |h|
      targeted         along the state: h + scale * h  (scale < 0 pushes against it)
    passes: latent indices to perturb (None = all).
    """

    kind: NoiseKind
    scale: float
    passes: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"unknown perturbation kind {self.kind!r}; expected one of {NOISE_KINDS}")
        if self.kind in ("gaussian", "gaussian_scaled", "uniform", "orthogonal") and self.scale < 0:
            raise ValueError(f"perturbation {self.kind} needs scale >= 0, got {self.scale}")

    def applies_to(self, latent_index: int) -> bool:
        return self.passes is None or latent_index in self.passes

    def _generators(self, latent_index: int, n_rows: int, row_keys: list[int] | None) -> list[torch.Generator]:
        # Salted so a noise stream never coincides with a tensor drawn from the same small seed elsewhere.
        base = 0x5EED_C0C0 + self.seed * 1_000_003 + latent_index
        if row_keys is None:
            return [torch.Generator(device="cpu").manual_seed(base)]
        if len(row_keys) != n_rows:
            raise ValueError(f"row_keys has {len(row_keys)} entries for {n_rows} rows")
        return [torch.Generator(device="cpu").manual_seed((base * 2_654_435_761 + k) % 2**63) for k in row_keys]

    def __call__(self, hidden: torch.Tensor, latent_index: int, row_keys: list[int] | None = None) -> torch.Tensor:
        """Perturb `hidden` [rows, d] for the given latent pass (returns a new tensor)."""
        if not self.applies_to(latent_index):
            return hidden
        h = hidden.float()
        d = h.shape[-1]
        norm = h.norm(dim=-1, keepdim=True)
        gens = self._generators(latent_index, h.shape[0], row_keys)

        def draw(sample):
            if len(gens) == 1:
                return sample(h.shape, generator=gens[0]).to(h.device)
            return torch.stack([sample((d,), generator=g) for g in gens]).to(h.device)

        def randn():
            return draw(torch.randn)

        if self.kind == "gaussian":
            noise = self.scale * randn()
        elif self.kind == "gaussian_scaled":
            noise = randn() * (self.scale * norm / math.sqrt(d))
        elif self.kind == "snr":
            signal_power = h.pow(2).mean(dim=-1, keepdim=True)
            noise_power = signal_power / (10.0 ** (self.scale / 10.0))
            noise = randn() * noise_power.sqrt()
        elif self.kind == "uniform":
            noise = (draw(torch.rand) * 2 - 1) * self.scale
        elif self.kind == "orthogonal":
            raw = randn()
            unit = h / norm.clamp_min(1e-12)
            raw = raw - (raw * unit).sum(-1, keepdim=True) * unit
            noise = raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12) * (self.scale * norm)
        else:  # targeted
            noise = self.scale * h
        return (h + noise).to(hidden.dtype)
