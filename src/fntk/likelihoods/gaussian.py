"""The Gaussian likelihood with fixed noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fntk.likelihoods.base import Likelihood, diag_factors


class Gaussian(Likelihood):
    r"""y = f + σ ε, ε ~ N(0, I): nll = ‖y − f‖²/(2σ²) + (k/2) log 2πσ², H = I/σ².

    Args:
        sigma: noise standard deviation, a positive float or a (k,) tensor (one per output).
    """

    name = "Gaussian"

    def __init__(self, sigma: float | Tensor = 1.0):
        s = torch.as_tensor(sigma, dtype=torch.float64)
        if s.dim() > 1 or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError(
                f"sigma must be a positive float or a 1-D tensor of positive values, got {sigma!r}"
            )
        self.sigma = s

    def check_num_outputs(self, k: int) -> None:
        if self.sigma.dim() == 1 and self.sigma.numel() not in (1, k):
            raise ValueError(f"sigma has {self.sigma.numel()} entries but the outputs have k={k} columns")

    def precision(self, f: Tensor) -> Tensor:
        return (1.0 / self.sigma.to(f) ** 2).expand(f.shape[1])

    def pure_nll(self, f, y):
        s2 = (self.sigma.to(f) ** 2).expand(f.shape[1])
        return 0.5 * (((y - f) ** 2) / s2 + torch.log(2 * math.pi * s2)).sum(-1)

    def pure_hvp(self, f, U, y):
        return U * self.precision(f)[None, :, None]

    def pure_hessian(self, f, y):
        return torch.diag_embed(self.precision(f).expand_as(f))

    def pure_factors(self, f, y):
        return diag_factors(self.precision(f).expand_as(f))

    def pure_inverse_link(self, f):
        return f

    def pure_kl(self, f_ref, f):
        return 0.5 * (((f - f_ref) ** 2) * self.precision(f)).sum(-1)

    def __repr__(self):
        return f"Gaussian(sigma={self.sigma.tolist()})"


__all__ = ["Gaussian"]
