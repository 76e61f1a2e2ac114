r"""Prior means of the NTK-GP and their coefficients by generalised least squares (GLS).

With f(x) = f_c(x; θ̂) the network's selected output, the prior mean in the data's units is

    "network":   m(x) = f(x) + b
    "constant":  m(x) = b                      (the paper's code)
    "scaled":    m(x) = a·f(x) + b

The GP works on standardised residuals z = (y − o(X) − μ)/σ_y, with the fixed offset o = f for
"network" and "scaled" and o = 0 for "constant" (μ, σ_y: :func:`fntk.gp.targets.standardise`).
In those units the mean is a linear model H β with the design H (n × q):

    "network", "constant":  H = [1]              β = (b′,)
    "scaled":               H = [1, f̃],  f̃ = (f − c_f)/s_f,  β = (b′, a′)

(c_f, s_f the mean and standard deviation of f over the training inputs: any basis of the
column space gives the same fit; this one is well conditioned). Back in the data's units
a = 1 + σ_y a′/s_f and b = μ + σ_y (b′ − a′ c_f/s_f).

For a covariance M of z (kernel plus noise), β is profiled out exactly: the marginal likelihood
log N(z | Hβ, M) is maximised over β by

    β̂ = (Hᵀ M⁻¹ H)⁻¹ Hᵀ M⁻¹ z,    (z − Hβ̂)ᵀ M⁻¹ (z − Hβ̂) = zᵀM⁻¹z − (HᵀM⁻¹z)ᵀ β̂,

so every solver needs only the three quadratic forms q_zz = zᵀM⁻¹z (k',), q_zH = HᵀM⁻¹z (k', q)
and Q = HᵀM⁻¹H (k', q, q) (:func:`gls`). Shapes carry a leading batch of k' outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fntk import persist

MEANS = ("network", "constant", "scaled")
#: relative spread of f below which the slope column is dropped (f constant on the inputs)
FLAT_RTOL = 1e-10


def offset_uses_network(mean: str) -> bool:
    """Whether the fixed offset o(x) of the mean is the network's output f(x)."""
    return mean in ("network", "scaled")


@persist.register("gp.Design")
@dataclass
class Design:
    """The columns of H: always 1; for "scaled" also f̃ = (f − center)/spread, per output (k',)."""

    slope: bool
    center: Tensor | None = None
    spread: Tensor | None = None

    @classmethod
    def build(cls, mean: str, f: Tensor | None) -> Design:
        """The design of ``mean`` on the training outputs f (k', n) (None unless "scaled")."""
        if mean != "scaled":
            return cls(False)
        center = f.mean(-1)
        spread = f.std(-1, correction=0)
        if bool((spread <= FLAT_RTOL * (center.abs() + f.abs().amax(-1))).any()):
            return cls(False)  # f is constant on X: a·f + b is just a constant
        return cls(True, center, spread)

    @property
    def q(self) -> int:
        return 2 if self.slope else 1

    def columns(self, f: Tensor | None, n: int, kk: int, like: Tensor) -> Tensor:
        """H (k', n, q) at points whose network outputs are f (k', n)."""
        ones = like.new_ones(kk, n, 1)
        if not self.slope:
            return ones
        return torch.cat([ones, ((f - self.center[:, None]) / self.spread[:, None])[..., None]], -1)

    def coefficients(self, beta: Tensor, mu: Tensor, sd: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) (k',) each in the data's units from β (k', q) (a = 1 for "network"; the caller
        reports a = 0 for "constant")."""
        if not self.slope:
            return torch.ones_like(mu), mu + sd * beta[:, 0]
        a_std = beta[:, 1] / self.spread
        return 1 + sd * a_std, mu + sd * (beta[:, 0] - a_std * self.center)


def gls(q_zz: Tensor, q_zH: Tensor, Q: Tensor, beta: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(quadratic form (z − Hβ)ᵀM⁻¹(z − Hβ) (k',), β (k', q)), at the GLS β̂ when ``beta`` is None.

    Args: q_zz (k',), q_zH (k', q), Q (k', q, q) as in the module docstring; ``beta`` fixed
    coefficients (k', q)."""
    if beta is None:
        beta = torch.linalg.solve(Q, q_zH[..., None])[..., 0]
        return q_zz - (q_zH * beta).sum(-1), beta
    quad = q_zz - 2 * (q_zH * beta).sum(-1) + (beta[..., None, :] @ Q @ beta[..., :, None])[..., 0, 0]
    return quad, beta


__all__ = ["MEANS", "Design", "gls", "offset_uses_network"]
