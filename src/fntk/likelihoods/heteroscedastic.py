"""The heteroscedastic Gaussian likelihood: a mean and a raw-variance output per target."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fntk.likelihoods.base import DiagonalHessian

_LINKS = ("softplus", "exp")


class HeteroscedasticGaussian(DiagonalHessian):
    r"""y ~ N(m, v) with k = 2d outputs f = (m (d), ρ (d)) and variance v = link(ρ) + min_variance.

    nll = Σ_j ½ log 2π v_j + (y_j − m_j)² / (2 v_j). H is the Fisher information in (m, ρ):
    diagonal with 1/v for the means and v'(ρ)² / (2 v²) for the raw variances (½ for the exp
    link), which is PSD (the NLL Hessian is not). ``inverse_link`` returns (m, v) as (n, 2d).

    Args:
        link: ``"softplus"`` or ``"exp"``, mapping the raw output ρ to the variance.
        min_variance: a non-negative floor added to the variance.
    """

    name = "heteroscedastic Gaussian"

    def __init__(self, link: str = "softplus", min_variance: float = 0.0):
        if link not in _LINKS:
            raise ValueError(f"link must be one of {_LINKS}, got {link!r}")
        if not (isinstance(min_variance, (int, float)) and min_variance >= 0):
            raise ValueError(f"min_variance must be a float >= 0, got {min_variance!r}")
        self.link, self.min_variance = link, float(min_variance)

    def check_num_outputs(self, k: int) -> None:
        if k % 2:
            raise ValueError(
                f"the heteroscedastic Gaussian needs an even number of outputs k = 2d (d means, then d raw "
                f"variances), got k={k}"
            )

    def _split(self, f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean (n, d), variance (n, d), dvariance/dρ (n, d))."""
        d = f.shape[1] // 2
        m, rho = f[:, :d], f[:, d:]
        if self.link == "exp":
            v = torch.exp(rho)
            dv = v
        else:
            v, dv = F.softplus(rho), torch.sigmoid(rho)
        return m, v + self.min_variance, dv

    def check_target_values(self, y, f, name):
        d = f.shape[1] // 2
        if y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"{name} must be a real tensor for the {self.name} likelihood, got {y.dtype}")
        y = y.to(f.dtype)
        if y.dim() == 1 and d == 1:
            y = y[:, None]
        if y.dim() != 2 or y.shape[1] != d:
            raise ValueError(
                f"{name} must have shape ({f.shape[0]}, {d})"
                + (f" or ({f.shape[0]},)" if d == 1 else "")
                + f" (one target per mean output), got {tuple(y.shape)}"
            )
        return y

    def pure_diag(self, f: Tensor) -> Tensor:
        _, v, dv = self._split(f)
        return torch.cat([1.0 / v, dv**2 / (2 * v**2)], dim=1)

    def pure_nll(self, f, y):
        m, v, _ = self._split(f)
        return 0.5 * (torch.log(2 * math.pi * v) + (y - m) ** 2 / v).sum(-1)

    def pure_inverse_link(self, f):
        m, v, _ = self._split(f)
        return torch.cat([m, v], dim=1)

    def pure_kl(self, f_ref, f):
        m0, v0, _ = self._split(f_ref)
        m1, v1, _ = self._split(f)
        return 0.5 * (torch.log(v1 / v0) + (v0 + (m0 - m1) ** 2) / v1 - 1).sum(-1)

    def __repr__(self):
        return f"HeteroscedasticGaussian(link={self.link!r}, min_variance={self.min_variance})"


__all__ = ["HeteroscedasticGaussian"]
