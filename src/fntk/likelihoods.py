r"""Per-example likelihoods: negative log-likelihoods and their output-space curvature.

A likelihood p(y | f) is a distribution over a target y given the network output f (k,) of one
point. For a batch, f is (n, k). Each likelihood gives

- ``nll(f, y)``              (n,)       −log p(y_i | f_i), per example;
- ``hessian(f, y)``          (n, k, k)  H_i, the output-space curvature used by the generalized
                                        Gauss-Newton matrix G = Σ_i J_iᵀ H_i J_i;
- ``hessian_matmul(f, U, y)`` (n, k, r) H_i U_i  (U (n, k, r) or (n, k) → (n, k));
- ``hessian_factors(f, y)``  (Q (n, k, m), λ (n, m)) with H_i = Q_i diag(λ_i) Q_iᵀ;
- ``inverse_link(f)``        (n, k)     the mean of p(y | f) (for the predictive);
- ``kl(f_ref, f)``           (n,)       KL(p(·|f_ref) ‖ p(·|f)), used by the finite-difference and
                                        autograd Fisher products of :mod:`fntk.curvature`.

For the named likelihoods H is the Fisher information of p(y | f) in the output f,

    H(f) = E_{y~p(·|f)}[∇_f log p ∇_f log pᵀ] = ∇²_{f'} KL(p(·|f) ‖ p(·|f'))|_{f'=f},

which is PSD and does not depend on y, so ``y`` is optional. For the canonical exponential
families (Gaussian with fixed σ, categorical, Bernoulli, Poisson with log link) it also equals
the Hessian ∇²_f nll(f, y). For the heteroscedastic Gaussian it is the Fisher in the (mean,
raw-variance) outputs (the NLL Hessian there is indefinite). :class:`GenericLikelihood` uses the
NLL Hessian ∇²_f nll(f, y) of a user function, taken by ``torch.func.hessian`` and vmapped over
points; it needs y.

Likelihoods are stateless apart from their hyperparameters; all methods are pure functions of
their tensor arguments (usable inside ``torch.func`` transforms through the ``_``-prefixed
versions, which skip validation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The base class and GenericLikelihood live in private modules (file size); re-exported here.
from fntk._generic_likelihood import GenericLikelihood
from fntk._likelihood_base import Likelihood, _diag_factors, _DiagonalHessian, _float_target


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

    def _prec(self, f: Tensor) -> Tensor:
        return (1.0 / self.sigma.to(f) ** 2).expand(f.shape[1])

    def _nll(self, f, y):
        s2 = (self.sigma.to(f) ** 2).expand(f.shape[1])
        return 0.5 * (((y - f) ** 2) / s2 + torch.log(2 * math.pi * s2)).sum(-1)

    def _hvp(self, f, U, y):
        return U * self._prec(f)[None, :, None]

    def _hessian(self, f, y):
        return torch.diag_embed(self._prec(f).expand_as(f))

    def _factors(self, f, y):
        return _diag_factors(self._prec(f).expand_as(f))

    def _inverse_link(self, f):
        return f

    def _kl(self, f_ref, f):
        return 0.5 * (((f - f_ref) ** 2) * self._prec(f)).sum(-1)

    def __repr__(self):
        return f"Gaussian(sigma={self.sigma.tolist()})"


_LINKS = ("softplus", "exp")


class HeteroscedasticGaussian(_DiagonalHessian):
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

    def _check_target(self, y, f, name):
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

    def _diag(self, f: Tensor) -> Tensor:
        _, v, dv = self._split(f)
        return torch.cat([1.0 / v, dv**2 / (2 * v**2)], dim=1)

    def _nll(self, f, y):
        m, v, _ = self._split(f)
        return 0.5 * (torch.log(2 * math.pi * v) + (y - m) ** 2 / v).sum(-1)

    def _inverse_link(self, f):
        m, v, _ = self._split(f)
        return torch.cat([m, v], dim=1)

    def _kl(self, f_ref, f):
        m0, v0, _ = self._split(f_ref)
        m1, v1, _ = self._split(f)
        return 0.5 * (torch.log(v1 / v0) + (v0 + (m0 - m1) ** 2) / v1 - 1).sum(-1)

    def __repr__(self):
        return f"HeteroscedasticGaussian(link={self.link!r}, min_variance={self.min_variance})"


class Categorical(Likelihood):
    r"""y ~ Categorical(softmax(f)) over k classes: nll = logsumexp(f) − f_y, H = diag(p) − p pᵀ.

    Targets: int labels (n,) in [0, k), or class probabilities (n, k) (soft labels).
    ``inverse_link`` is softmax. H = A Aᵀ with A = diag(√p) − p √pᵀ (used for exact diagonals).
    """

    name = "categorical"

    def check_num_outputs(self, k: int) -> None:
        if k < 2:
            raise ValueError(f"the categorical likelihood needs k >= 2 logits per point, got k={k}")

    def _check_target(self, y, f, name):
        n, k = f.shape
        if y.is_floating_point():
            if tuple(y.shape) != (n, k):
                raise ValueError(
                    f"{name}: floating-point targets are class probabilities of shape ({n}, {k}), got "
                    f"{tuple(y.shape)}; pass int labels of shape ({n},) otherwise"
                )
            return y.to(f.dtype)
        if y.dtype == torch.bool or y.is_complex() or y.dim() != 1:
            raise ValueError(f"{name} must be int labels of shape ({n},), got {y.dtype} {tuple(y.shape)}")
        if bool((y < 0).any()) or bool((y >= k).any()):
            raise ValueError(
                f"{name} has labels outside [0, {k}) (min {int(y.min())}, max {int(y.max())}), k={k}"
            )
        return y.long()

    def _nll(self, f, y):
        logp = torch.log_softmax(f, dim=-1)
        if y.is_floating_point():
            return -(y * logp).sum(-1)
        return -logp.gather(1, y[:, None])[:, 0]

    def _hvp(self, f, U, y):
        p = torch.softmax(f, dim=-1)[..., None]
        return p * U - p * (p * U).sum(1, keepdim=True)

    def _hessian(self, f, y):
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

    def _factors(self, f, y):
        p = torch.softmax(f, dim=-1)
        s = p.sqrt()
        A = torch.diag_embed(s) - p[:, :, None] * s[:, None, :]
        return A, torch.ones_like(p)

    def _inverse_link(self, f):
        return torch.softmax(f, dim=-1)

    def _kl(self, f_ref, f):
        lp0 = torch.log_softmax(f_ref, dim=-1)
        return (lp0.exp() * (lp0 - torch.log_softmax(f, dim=-1))).sum(-1)


class _Elementwise(_DiagonalHessian):
    """Independent outputs, y_ij ~ p(· | f_ij), with diagonal H: targets are real, laid out like f
    ((n, k), or (n,) when k = 1), and must lie in [0, ``_high``] (no upper bound when ``None``).
    """

    _high: float | None = None
    #: What the targets must do, for the error message ("{name} must {_range} for the ...").
    _range: str = ""

    def _check_target(self, y, f, name):
        y = _float_target(y, f, name, self.name)
        if bool((y < 0).any()) or (self._high is not None and bool((y > self._high).any())):
            raise ValueError(f"{name} must {self._range} for the {self.name} likelihood")
        return y


class Bernoulli(_Elementwise):
    r"""y ∈ {0, 1} ~ Bernoulli(σ(f)), elementwise over the k outputs (k = 1: one logit per point).

    nll = Σ softplus(f) − y f, H = diag(σ(f)(1 − σ(f))). Targets (n, k) (or (n,) when k = 1) in
    [0, 1] (soft targets allowed). ``inverse_link`` is the sigmoid.
    """

    name = "Bernoulli"
    _high, _range = 1.0, "lie in [0, 1]"

    def _diag(self, f):
        s = torch.sigmoid(f)
        return s * (1 - s)

    def _nll(self, f, y):
        return (F.softplus(f) - y * f).sum(-1)

    def _inverse_link(self, f):
        return torch.sigmoid(f)

    def _kl(self, f_ref, f):
        p0 = torch.sigmoid(f_ref)
        return (
            p0 * (F.logsigmoid(f_ref) - F.logsigmoid(f))
            + (1 - p0) * (F.logsigmoid(-f_ref) - F.logsigmoid(-f))
        ).sum(-1)


class Poisson(_Elementwise):
    r"""y ∈ ℕ ~ Poisson(exp(f)), elementwise over the k outputs (log link, canonical).

    nll = Σ exp(f) − y f + log y!, H = diag(exp(f)). Targets (n, k) (or (n,) when k = 1), ≥ 0.
    ``inverse_link`` is exp (the rate).
    """

    name = "Poisson"
    _range = "be non-negative counts"

    def _diag(self, f):
        return torch.exp(f)

    def _nll(self, f, y):
        return (torch.exp(f) - y * f + torch.lgamma(y + 1)).sum(-1)

    def _inverse_link(self, f):
        return torch.exp(f)

    def _kl(self, f_ref, f):
        lam0 = torch.exp(f_ref)
        return (lam0 * (f_ref - f) - lam0 + torch.exp(f)).sum(-1)


__all__ = [
    "Likelihood",
    "Gaussian",
    "HeteroscedasticGaussian",
    "Categorical",
    "Bernoulli",
    "Poisson",
    "GenericLikelihood",
]
