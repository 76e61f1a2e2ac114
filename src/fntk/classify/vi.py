r"""Gaussian variational inference for a linearized classifier on a low-rank weight subspace.

Weights w = μ₀ + U u + w_⊥ with U (p × r) orthonormal, spanning the top-r right singular vectors of
J(X) (equivalently the top-r eigenvectors of the training NTK K = J Jᵀ: J U = Q_r diag(√e_r)).
The prior w − μ₀ ~ N(0, λ⁻¹ I) splits into u ~ N(0, λ⁻¹ I_r) and w_⊥ ~ N(0, λ⁻¹(I − U Uᵀ)); the
training logits depend (up to the discarded spectrum) on u only, f(x_i) = m₀(x_i) + Φ_i u with
Φ_i = J(x_i) U (k × r), so the variational family is

    q(u) = N(μ, C Cᵀ) (C lower triangular, r × r),   q(w_⊥) = prior.

When r ≥ rank J(X) this is exact: the optimal Gaussian q(w) of a GLM with an isotropic Gaussian
prior has exactly this form (prior in the directions the data do not see). ELBO:

    ELBO = Σ_i E_{f_i ~ N(m₀_i + Φ_i μ, Φ_i C Cᵀ Φ_iᵀ)} log p(y_i | f_i) − KL(q(u) ‖ N(0, λ⁻¹ I)),
    KL = ½[λ(‖C‖_F² + ‖μ‖²) − r − r log λ − 2 Σ_j log C_jj],

with the expectation by the *local reparameterization in function space*: each point's logits
are drawn from their own k-dimensional marginal, f_is = m_i + chol(Σ_i) ε_is, Σ_i = Φ_i C Cᵀ Φ_iᵀ,
ε_is ~ N(0, I_k) independent per point (no weight noise shared across points, so the estimator's
variance does not grow with n), in antithetic pairs ±ε. The ε are drawn once (a fixed
sample-average objective), which makes the ELBO deterministic, so L-BFGS with a strong-Wolfe line
search increases it monotonically. Because the noise is k-dimensional per point (not r-dimensional
in weight space), q cannot tune itself to the particular draws (sampling u instead overfits the
fixed noise badly when r is large).

Predictive at x*: logits N(m₀* + Φ* μ, Φ* C Cᵀ Φ*ᵀ + λ⁻¹(K** − Φ* Φ*ᵀ)), the last term being the
prior variance of the directions outside the subspace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fntk import persist
from fntk.likelihoods import Likelihood, resolve
from fntk.linalg import autograd_evaluate, run_lbfgs, safe_cholesky

F64 = torch.float64


@persist.register("classify.VIResult")
@dataclass
class VIResult:
    """The fitted q(u) = N(mean, scale scaleᵀ), the ELBO per L-BFGS iteration and the final ELBO."""

    mean: Tensor
    scale: Tensor
    elbo_history: list = field(default_factory=list)
    elbo: float = float("nan")
    converged: bool = False
    n_iter: int = 0


def kl_to_prior(mu: Tensor, C: Tensor, lam: float) -> Tensor:
    """KL(N(μ, C Cᵀ) ‖ N(0, λ⁻¹ I_r)) for lower-triangular C."""
    r = mu.shape[0]
    return 0.5 * (
        lam * (C.square().sum() + mu.square().sum())
        - r
        - r * math.log(lam)
        - 2 * torch.log(C.diagonal().abs()).sum()
    )


def expected_loglik(lik: Likelihood | str, y: Tensor, mean: Tensor, Sig: Tensor, xi: Tensor) -> Tensor:
    """Σ_i E_{f_i ~ N(mean_i, Σ_i)} log p(y_i | f_i) by the fixed draws f_is = mean_i + chol(Σ_i) ε_is:
    mean (n, k), Σ (n, k, k), ε (n, S, k). Differentiable in mean and Σ."""
    lik = resolve(lik, "lik")
    n, S, k = xi.shape
    # Σ_i may be singular (rank < k). A fixed *relative* jitter, 1e-9·mean diag(Σ_i) (plus the
    # smallest normal float, for Σ_i = 0), far below the Monte Carlo error, keeps chol defined at
    # every scale of the logits. It is deliberately not fntk.linalg.safe_cholesky's escalating
    # retry: inside autograd the ELBO must stay one smooth, deterministic function of (μ, C) for
    # L-BFGS's line search. A Σ_i that is still not factorisable (NaN, or indefinite beyond the
    # jitter) is refused with a ValueError instead of torch's error.
    scale = Sig.diagonal(dim1=-2, dim2=-1).mean(-1).detach()
    jitter = 1e-9 * scale + torch.finfo(Sig.dtype).tiny
    eye = torch.eye(k, dtype=Sig.dtype, device=Sig.device)
    Lc, info = torch.linalg.cholesky_ex(Sig + jitter[:, None, None] * eye)
    if bool((info > 0).any()):
        i = int((info > 0).nonzero()[0, 0])
        raise ValueError(
            f"the ELBO's logit covariance of point {i} is not positive semi-definite (diagonal "
            f"{Sig[i].diagonal().tolist()}): the variational scale or the Jacobian has non-finite or "
            "huge values; check the model's outputs and prior_precision"
        )
    f = mean[:, None, :] + torch.einsum("nkl,nsl->nsk", Lc, xi)  # (n, S, k)
    return -lik.pure_nll(f.reshape(n * S, -1), y.repeat_interleave(S, dim=0)).sum() / S


def elbo(
    lik: Likelihood | str, y: Tensor, m0: Tensor, Phi: Tensor, mu: Tensor, C: Tensor, lam: float, xi: Tensor
) -> Tensor:
    """The sample-average ELBO: m0 (n, k), Φ (n, k, r), μ (r,), C (r, r), ε (n, S, k)."""
    lik = resolve(lik, "lik")
    A = Phi @ C  # (n, k, r)
    return expected_loglik(lik, y, m0 + Phi @ mu, A @ A.mT, xi) - kl_to_prior(mu, C, lam)


def antithetic_normals(n: int, num_samples: int, k: int, seed: int, device: torch.device) -> Tensor:
    """Fixed standard normals ε (n, S, k) in ± pairs (antithetic: the odd moments cancel)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    half = torch.randn(n, (num_samples + 1) // 2, k, generator=g, dtype=F64)
    return torch.cat([half, -half], dim=1)[:, :num_samples].to(device)


def fit_vi(
    lik: Likelihood | str,
    y: Tensor,
    m0: Tensor,
    Phi: Tensor,
    lam: float,
    mu0: Tensor | None = None,
    C0: Tensor | None = None,
    num_samples: int = 16,
    max_iter: int = 300,
    tol: float = 1e-7,
    seed: int = 0,
    callback: Callable[[dict], None] | None = None,
) -> VIResult:
    r"""Maximise the ELBO over (μ, C) by L-BFGS (strong Wolfe), one iteration at a time.

    Args:
        lik, y: likelihood (an object or its name, :func:`fntk.likelihoods.resolve`) and checked
            targets of the n training points.
        m0: prior-mean logits (n, k); Phi: Φ = J U (n, k, r).
        lam: prior precision λ.
        mu0, C0: initial mean (r,) and lower-triangular scale (r, r) (default: the prior).
        num_samples: S, function-space samples per point (fixed across iterations, ±pairs).
        max_iter: L-BFGS iterations; tol: stop when the ELBO changes by less than tol·(1 + |ELBO|).
        seed: seeds the fixed ξ; callback: see :func:`run_lbfgs`.
    """
    lik = resolve(lik, "lik")
    n, k, r = Phi.shape
    xi = antithetic_normals(n, num_samples, k, seed, Phi.device)
    mu = (torch.zeros(r, dtype=F64) if mu0 is None else mu0.clone()).to(Phi.device).requires_grad_(True)
    C0 = torch.eye(r, dtype=F64, device=Phi.device) / math.sqrt(lam) if C0 is None else C0
    # C = tril(M, -1) + diag(exp(d)): unconstrained, with a positive diagonal
    d = torch.log(C0.diagonal().abs().clamp_min(1e-30)).clone().to(Phi.device).requires_grad_(True)
    M = torch.tril(C0, -1).clone().to(Phi.device).requires_grad_(True)
    tril = torch.tril(torch.ones(r, r, dtype=torch.bool, device=Phi.device), -1)

    def scale() -> Tensor:
        return torch.where(tril, M, torch.zeros_like(M)) + torch.diag(torch.exp(d))

    objective = autograd_evaluate(lambda: -elbo(lik, y, m0, Phi, mu, scale(), lam, xi))
    history, converged = run_lbfgs([mu, d, M], objective, max_iter, tol, callback)
    with torch.no_grad():
        C = scale().detach()
    return VIResult(mu.detach(), C, history, history[-1], converged, len(history) - 1)


def laplace_init(lik: Likelihood | str, y: Tensor, m0: Tensor, Phi: Tensor, lam: float, u: Tensor):
    """The Laplace approximation in the subspace at u: (u, chol((λI + Σ Φ_iᵀ H_i Φ_i)⁻¹))."""
    lik = resolve(lik, "lik")
    f = m0 + Phi @ u
    Q, ev = lik.pure_factors(f, y)
    B = torch.einsum("nkm,nkr->nmr", Q * ev.clamp_min(0).sqrt()[:, None, :], Phi).reshape(-1, Phi.shape[2])
    P = B.T @ B
    P.diagonal().add_(lam)
    Pinv = torch.cholesky_inverse(safe_cholesky(P, "the subspace Laplace precision"))
    return u, safe_cholesky(0.5 * (Pinv + Pinv.T), "the subspace Laplace covariance")


def predictive(
    m0s: Tensor, Phis: Tensor, Kss: Tensor, mu: Tensor, C: Tensor, lam: float
) -> tuple[Tensor, Tensor]:
    """Logit mean (c, k) and covariance (c, k, k): Φ* C Cᵀ Φ*ᵀ + λ⁻¹(K** − Φ* Φ*ᵀ) (the latter
    clamped PSD: it is the prior variance outside the subspace)."""
    mean = m0s + Phis @ mu
    A = Phis @ C
    resid = Kss - Phis @ Phis.mT
    ev, Q = torch.linalg.eigh(0.5 * (resid + resid.mT))
    resid = (Q * ev.clamp_min(0)[..., None, :]) @ Q.mT
    return mean, A @ A.mT + resid / lam


__all__ = [
    "VIResult",
    "fit_vi",
    "elbo",
    "expected_loglik",
    "kl_to_prior",
    "laplace_init",
    "predictive",
    "antithetic_normals",
]
