"""The Bernoulli (sigmoid) likelihood, elementwise over the outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fntk.likelihoods.base import Elementwise


class Bernoulli(Elementwise):
    r"""y ∈ {0, 1} ~ Bernoulli(σ(f)), elementwise over the k outputs (k = 1: one logit per point).

    nll = Σ softplus(f) − y f, H = diag(σ(f)(1 − σ(f))). Targets (n, k) (or (n,) when k = 1) in
    [0, 1] (soft targets allowed). ``inverse_link`` is the sigmoid.
    """

    name = "Bernoulli"
    _high, _range = 1.0, "lie in [0, 1]"

    def pure_diag(self, f):
        s = torch.sigmoid(f)
        return s * (1 - s)

    def pure_nll(self, f, y):
        return (F.softplus(f) - y * f).sum(-1)

    def pure_inverse_link(self, f):
        return torch.sigmoid(f)

    def pure_kl(self, f_ref, f):
        p0 = torch.sigmoid(f_ref)
        return (
            p0 * (F.logsigmoid(f_ref) - F.logsigmoid(f))
            + (1 - p0) * (F.logsigmoid(-f_ref) - F.logsigmoid(-f))
        ).sum(-1)


__all__ = ["Bernoulli"]
