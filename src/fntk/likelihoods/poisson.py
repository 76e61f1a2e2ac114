"""The Poisson likelihood with log link, elementwise over the outputs."""

from __future__ import annotations

import torch

from fntk.likelihoods.base import Elementwise


class Poisson(Elementwise):
    r"""y ∈ ℕ ~ Poisson(exp(f)), elementwise over the k outputs (log link, canonical).

    nll = Σ exp(f) − y f + log y!, H = diag(exp(f)). Targets (n, k) (or (n,) when k = 1), ≥ 0.
    ``inverse_link`` is exp (the rate).
    """

    name = "Poisson"
    _range = "be non-negative counts"

    def pure_diag(self, f):
        return torch.exp(f)

    def pure_nll(self, f, y):
        return (torch.exp(f) - y * f + torch.lgamma(y + 1)).sum(-1)

    def pure_inverse_link(self, f):
        return torch.exp(f)

    def pure_kl(self, f_ref, f):
        lam0 = torch.exp(f_ref)
        return (lam0 * (f_ref - f) - lam0 + torch.exp(f)).sum(-1)


__all__ = ["Poisson"]
