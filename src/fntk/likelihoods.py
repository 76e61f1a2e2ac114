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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import hessian, vmap


class Likelihood:
    """Base class. Subclasses implement the ``_``-prefixed pure methods on validated tensors."""

    #: Human-readable name used in error messages.
    name: str = "likelihood"
    #: Whether the output Hessian depends on the target (then ``y`` is required).
    hessian_needs_target: bool = False
    #: Whether :meth:`kl` is available (finite-difference and autograd products need it).
    has_kl: bool = True

    # ------------------------------------------------------------------ validation
    def check_num_outputs(self, k: int) -> None:
        """Raise ``ValueError`` if the likelihood cannot take k outputs per point."""

    def check_outputs(self, f: Tensor, name: str = "f") -> Tensor:
        """f: (n, k), or (n,) for one output → (n, k) floating point."""
        if not isinstance(f, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"{name} must be floating point (network outputs), got {f.dtype}")
        if f.dim() == 1:
            f = f[:, None]
        if f.dim() != 2:
            raise ValueError(f"{name} must have shape (n, k) (or (n,) for k = 1), got {tuple(f.shape)}")
        self.check_num_outputs(f.shape[1])
        return f

    def check_target(self, y: Tensor | None, f: Tensor, name: str = "y") -> Tensor | None:
        """Validate y against checked outputs f (n, k); ``None`` is allowed unless needed."""
        if y is None:
            if self.hessian_needs_target:
                raise ValueError(
                    f"{name} is required by the {self.name} likelihood (its Hessian depends on it)"
                )
            return None
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] != f.shape[0]:
            raise ValueError(
                f"{name} must have one target per point (leading {f.shape[0]}), got shape {tuple(y.shape)}"
            )
        return self._check_target(y.to(f.device), f, name)

    def _check_target(self, y: Tensor, f: Tensor, name: str) -> Tensor:
        """Per-likelihood target check (y already has n rows and lives on f's device)."""
        return _float_target(y, f, name, self.name)

    def _check_u(self, U: Tensor, f: Tensor, name: str = "U") -> tuple[Tensor, bool]:
        n, k = f.shape
        if not isinstance(U, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(U).__name__}")
        if U.dim() in (2, 3) and tuple(U.shape[:2]) == (n, k):
            U = U.to(device=f.device, dtype=f.dtype)
            return (U[..., None], True) if U.dim() == 2 else (U, False)
        raise ValueError(f"{name} must have shape ({n}, {k}) or ({n}, {k}, r), got {tuple(U.shape)}")

    # ------------------------------------------------------------------ public API
    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        """−log p(y_i | f_i) per example: f (n, k), y (n, ...) → (n,)."""
        f = self.check_outputs(f)
        if y is None:
            raise ValueError(f"y is required to evaluate the {self.name} negative log-likelihood")
        return self._nll(f, self.check_target(y, f))

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Dense output-space Hessians H_i: (n, k, k)."""
        f = self.check_outputs(f)
        return self._hessian(f, self.check_target(y, f))

    def hessian_matmul(self, f: Tensor, U: Tensor, y: Tensor | None = None) -> Tensor:
        """H_i U_i per point: U (n, k, r) → (n, k, r), or (n, k) → (n, k)."""
        f = self.check_outputs(f)
        y = self.check_target(y, f)
        U, single = self._check_u(U, f)
        out = self._hvp(f, U, y)
        return out[..., 0] if single else out

    def hessian_factors(self, f: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(Q (n, k, m), λ (n, m)) with H_i = Q_i diag(λ_i) Q_iᵀ (used for exact diagonals)."""
        f = self.check_outputs(f)
        return self._factors(f, self.check_target(y, f))

    def inverse_link(self, f: Tensor) -> Tensor:
        """The mean of p(y | f): (n, k) → (n, k) (see each class for its meaning)."""
        return self._inverse_link(self.check_outputs(f))

    def kl(self, f_ref: Tensor, f: Tensor) -> Tensor:
        """KL(p(·|f_ref_i) ‖ p(·|f_i)) per example: (n, k), (n, k) → (n,)."""
        f_ref, f = self.check_outputs(f_ref, "f_ref"), self.check_outputs(f)
        if f_ref.shape != f.shape:
            raise ValueError(
                f"f_ref and f must have the same shape, got {tuple(f_ref.shape)} and {tuple(f.shape)}"
            )
        if not self.has_kl:
            raise NotImplementedError(
                f"the {self.name} likelihood has no KL divergence (pass kl= to define one)"
            )
        return self._kl(f_ref, f)

    # ------------------------------------------------------------------ pure parts
    def _nll(self, f: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _hvp(self, f: Tensor, U: Tensor, y: Tensor | None) -> Tensor:
        """H U for U (n, k, r) → (n, k, r); default from the dense Hessian."""
        return torch.einsum("nkl,nlr->nkr", self._hessian(f, y), U)

    def _hessian(self, f: Tensor, y: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _factors(self, f: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        lam, Q = torch.linalg.eigh(self._hessian(f, y))
        return Q, lam

    def _hessian_operator(self, f: Tensor, y: Tensor | None) -> Callable[[Tensor, slice], Tensor]:
        """(U (m, k, r), s) ↦ H[s] U for the points s of fixed (f, y); may precompute (a dense H)."""
        return lambda U, s: self._hvp(f[s], U, None if y is None else y[s])

    def _inverse_link(self, f: Tensor) -> Tensor:
        raise NotImplementedError

    def _kl(self, f_ref: Tensor, f: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _float_target(y: Tensor, f: Tensor, name: str, lik: str) -> Tensor:
    """Real-valued targets with the same (n, k) layout as f ((n,) allowed when k = 1)."""
    if not (
        y.is_floating_point() or y.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    ):
        raise TypeError(f"{name} must be a real tensor for the {lik} likelihood, got {y.dtype}")
    y = y.to(f.dtype)
    n, k = f.shape
    if y.dim() == 1 and k == 1:
        y = y[:, None]
    if tuple(y.shape) != (n, k):
        raise ValueError(
            f"{name} must have shape ({n}, {k})" + (f" or ({n},)" if k == 1 else "") + f" for the {lik} "
            f"likelihood with n={n} points and k={k} outputs, got {tuple(y.shape)}"
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return y


def _diag_factors(d: Tensor) -> tuple[Tensor, Tensor]:
    """A diagonal Hessian diag(d) (n, k) as factors (I, d)."""
    n, k = d.shape
    return torch.eye(k, dtype=d.dtype, device=d.device).expand(n, k, k), d


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


class HeteroscedasticGaussian(Likelihood):
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

    def _hvp(self, f, U, y):
        return U * self._diag(f)[..., None]

    def _hessian(self, f, y):
        return torch.diag_embed(self._diag(f))

    def _factors(self, f, y):
        return _diag_factors(self._diag(f))

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


class Bernoulli(Likelihood):
    r"""y ∈ {0, 1} ~ Bernoulli(σ(f)), elementwise over the k outputs (k = 1: one logit per point).

    nll = Σ softplus(f) − y f, H = diag(σ(f)(1 − σ(f))). Targets (n, k) (or (n,) when k = 1) in
    [0, 1] (soft targets allowed). ``inverse_link`` is the sigmoid.
    """

    name = "Bernoulli"

    def _check_target(self, y, f, name):
        y = _float_target(y, f, name, self.name)
        if bool((y < 0).any()) or bool((y > 1).any()):
            raise ValueError(f"{name} must lie in [0, 1] for the Bernoulli likelihood")
        return y

    def _diag(self, f):
        s = torch.sigmoid(f)
        return s * (1 - s)

    def _nll(self, f, y):
        return (F.softplus(f) - y * f).sum(-1)

    def _hvp(self, f, U, y):
        return U * self._diag(f)[..., None]

    def _hessian(self, f, y):
        return torch.diag_embed(self._diag(f))

    def _factors(self, f, y):
        return _diag_factors(self._diag(f))

    def _inverse_link(self, f):
        return torch.sigmoid(f)

    def _kl(self, f_ref, f):
        p0 = torch.sigmoid(f_ref)
        return (
            p0 * (F.logsigmoid(f_ref) - F.logsigmoid(f))
            + (1 - p0) * (F.logsigmoid(-f_ref) - F.logsigmoid(-f))
        ).sum(-1)


class Poisson(Likelihood):
    r"""y ∈ ℕ ~ Poisson(exp(f)), elementwise over the k outputs (log link, canonical).

    nll = Σ exp(f) − y f + log y!, H = diag(exp(f)). Targets (n, k) (or (n,) when k = 1), ≥ 0.
    ``inverse_link`` is exp (the rate).
    """

    name = "Poisson"

    def _check_target(self, y, f, name):
        y = _float_target(y, f, name, self.name)
        if bool((y < 0).any()):
            raise ValueError(f"{name} must be non-negative counts for the Poisson likelihood")
        return y

    def _nll(self, f, y):
        return (torch.exp(f) - y * f + torch.lgamma(y + 1)).sum(-1)

    def _hvp(self, f, U, y):
        return U * torch.exp(f)[..., None]

    def _hessian(self, f, y):
        return torch.diag_embed(torch.exp(f))

    def _factors(self, f, y):
        return _diag_factors(torch.exp(f))

    def _inverse_link(self, f):
        return torch.exp(f)

    def _kl(self, f_ref, f):
        lam0 = torch.exp(f_ref)
        return (lam0 * (f_ref - f) - lam0 + torch.exp(f)).sum(-1)


class GenericLikelihood(Likelihood):
    r"""A likelihood from any per-example NLL ``nll(f_i (k,), y_i) -> scalar``.

    H_i = ∇²_f nll(f_i, y_i) by ``torch.func.hessian`` (forward-over-reverse), vmapped over the
    n points; so ``nll`` must be a pure torch function that works under ``torch.func`` (no
    ``.item()``, no in-place updates of its arguments). H may be indefinite away from a minimum.
    The target is required; y (n, ...) is split along its first axis.

    Args:
        nll: per-example negative log-likelihood.
        num_outputs: the required k, or ``None`` for any.
        inverse_link: map (n, k) → (n, ·) for the predictive mean (default identity).
        kl: optional per-example ``kl(f_ref_i, f_i) -> scalar``; enables the finite-difference
            and autograd products.
        name: used in error messages.
    """

    hessian_needs_target = True

    def __init__(
        self,
        nll: Callable[[Tensor, Tensor], Tensor],
        num_outputs: int | None = None,
        inverse_link: Callable[[Tensor], Tensor] | None = None,
        kl: Callable[[Tensor, Tensor], Tensor] | None = None,
        name: str = "generic",
    ):
        if not callable(nll):
            raise TypeError(f"nll must be callable (f_i, y_i) -> scalar, got {type(nll).__name__}")
        if num_outputs is not None and not (isinstance(num_outputs, int) and num_outputs > 0):
            raise ValueError(f"num_outputs must be a positive int or None, got {num_outputs!r}")
        self._nll_fn, self._link, self._kl_fn = nll, inverse_link, kl
        self.num_outputs, self.name = num_outputs, name
        self.has_kl = kl is not None
        self._vnll = vmap(nll)
        self._vhess = vmap(hessian(nll))
        self._vkl = vmap(kl) if kl is not None else None

    def check_num_outputs(self, k: int) -> None:
        if self.num_outputs is not None and k != self.num_outputs:
            raise ValueError(f"the {self.name} likelihood expects k={self.num_outputs} outputs, got k={k}")

    def _check_target(self, y, f, name):
        return y.to(f.dtype) if y.is_floating_point() else y

    def _nll(self, f, y):
        out = self._vnll(f, y)
        if out.shape != (f.shape[0],):
            raise ValueError(
                f"the {self.name} nll must return a scalar per example, got shape {tuple(out.shape[1:])}"
            )
        return out

    def _hessian(self, f, y):
        return self._vhess(f, y)

    def _hessian_operator(self, f, y):
        H = self._vhess(f, y)  # (n, k, k), computed once per operator
        return lambda U, s: torch.einsum("nkl,nlr->nkr", H[s], U)

    def _inverse_link(self, f):
        return f if self._link is None else self._link(f)

    def _kl(self, f_ref, f):
        return self._vkl(f_ref, f)

    def __repr__(self):
        return f"GenericLikelihood(name={self.name!r}, num_outputs={self.num_outputs})"


__all__ = [
    "Likelihood",
    "Gaussian",
    "HeteroscedasticGaussian",
    "Categorical",
    "Bernoulli",
    "Poisson",
    "GenericLikelihood",
]
