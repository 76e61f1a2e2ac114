r"""Mean-field Gaussian variational inference for a linearized classifier.

The variational family is a diagonal Gaussian over all p selected weights,

    q(w) = N(m, diag(s²)),   prior w ~ N(μ₀, λ⁻¹ I_p).

The logits are linear in w, so under q the training logits of point i are exactly Gaussian
(the local reparameterization in function space):

    f_i ~ N(f(x_i; θ̂) + J_i (m − θ̂),  J_i diag(s²) J_iᵀ)   (k, and k × k per point),

    ELBO = Σ_i E_{f_i} log p(y_i | f_i) − KL,
    KL   = ½ Σ_j [λ s_j² + λ (m_j − μ₀_j)² − 1 − log λ − 2 log s_j],

with the expectation a fixed sample average over antithetic draws of each point's k-dimensional
logits (so L-BFGS sees a deterministic objective; see :mod:`fntk.classify.vi`). Unlike the low-rank
subspace family, the per-point covariance needs the Jacobians J_i (k × p) themselves: they are
held in memory when n·k·p floats fit the memory budget, and otherwise recomputed chunk by chunk
at every ELBO evaluation (exact but slow when both n and p are large; use the subspace family or a
parameter subset there). Mean-field q under-estimates posterior correlations by construction; it
is offered because it is the standard baseline family, not because it is the better one.

Shapes: n points, k outputs, p parameters, c points per chunk, S samples per point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from fntk.classify.vi import VIResult, antithetic_normals, expected_loglik
from fntk.likelihoods import Likelihood, resolve
from fntk.linalg import run_lbfgs
from fntk.linearize import Linearized

F64 = torch.float64


def _jacobian_chunks(lin: Linearized, x: Tensor, cache: list | None = None) -> Iterator[tuple[slice, Tensor]]:
    """(slice, J(x_s) (c, k, p) float64) over chunks of x sized to the memory budget; when ``cache``
    is a list and the whole J fits the budget, J is computed once and kept in it."""
    n, k, p = x.shape[0], lin.num_outputs, lin.num_params
    if cache:
        yield slice(0, n), cache[0]
        return
    per_point = k * p * 8 * 3  # J in float64 plus the products formed from it
    if cache is not None and n * per_point <= lin.memory_budget:
        J = lin.jacobian_mat(x).to(F64)
        cache.append(J)
        yield slice(0, n), J
        return
    for s in lin.chunks(n, max(1, lin.memory_budget // per_point)):
        yield s, lin.jacobian_mat(x[s]).to(F64)


def kl_meanfield(m: Tensor, log_s: Tensor, mu0: Tensor, lam: float) -> Tensor:
    """KL(N(m, diag(s²)) ‖ N(μ₀, λ⁻¹ I)) with s = exp(log_s): (m, log_s, μ₀ all (p,))."""
    return 0.5 * (
        lam * (torch.exp(2 * log_s).sum() + (m - mu0).square().sum())
        - m.numel() * (1 + math.log(lam))
        - 2 * log_s.sum()
    )


def diagonal_laplace_scale(
    lin: Linearized, x: Tensor, y: Tensor, lik: Likelihood | str, w: Tensor, lam: float,
    cache: list | None = None,
) -> Tensor:
    """s = (λ + diag(Σ_i J_iᵀ H_i J_i))^-½ at the linearized logits f_lin(x; w): the diagonal Laplace
    approximation at w, the natural start of mean-field VI from the MAP. (p,) float64. ``cache``:
    a list shared with :func:`fit_meanfield`, so that a J that fits the budget is formed once."""
    lik = resolve(lik, "lik")
    f0, theta = lin.forward(x).to(F64), lin.theta.to(F64)
    diag = torch.full_like(theta, lam)
    for s, J in _jacobian_chunks(lin, x, cache):
        f = f0[s] + J @ (w - theta)
        Q, ev = lik.pure_factors(f, y[s])
        B = torch.einsum("ckm,ckp->cmp", Q * ev.clamp_min(0).sqrt()[:, None, :], J)
        diag += B.square().sum((0, 1))
    return diag.rsqrt()


def fit_meanfield(
    lin: Linearized,
    x: Tensor,
    y: Tensor,
    lik: Likelihood | str,
    mu0: Tensor,
    lam: float,
    m_init: Tensor,
    s_init: Tensor,
    num_samples: int = 16,
    max_iter: int = 300,
    tol: float = 1e-7,
    seed: int = 0,
    callback: Callable[[dict], None] | None = None,
    cache: list | None = None,
) -> VIResult:
    r"""Maximise the mean-field ELBO over (m, log s) by L-BFGS (see the module docstring).

    Args:
        lin: the linearized model; x: checked inputs (n, ...); y: checked targets; lik: likelihood
            (an object or its name, :func:`fntk.likelihoods.resolve`).
        mu0: prior mean (p,); lam: prior precision λ.
        m_init, s_init: initial mean and standard deviations (p,).
        num_samples: S logit draws per point (fixed, ± pairs); max_iter, tol: see
            :func:`fntk.linalg.run_lbfgs`; seed: seeds the draws; callback: per iteration.
        cache: a list holding (or to hold) the whole J, shared with :func:`diagonal_laplace_scale`.

    Returns a :class:`~fntk.classify.vi.VIResult` with ``mean`` = m and ``scale`` = s (both (p,)).
    """
    lik = resolve(lik, "lik")
    n, k = x.shape[0], lin.num_outputs
    f0, theta = lin.forward(x).to(F64), lin.theta.to(F64)
    mu0 = mu0.to(F64)
    xi = antithetic_normals(n, num_samples, k, seed, theta.device)
    m = m_init.to(F64).clone().requires_grad_(True)
    log_s = torch.log(s_init.to(F64)).clone().requires_grad_(True)
    cache = [] if cache is None else cache

    def evaluate(need_grad: bool) -> Tensor:
        # chunk by chunk, backpropagating each chunk at once, so that autograd never holds more
        # than one chunk of J (the whole J may not fit in memory)
        total = 0.0
        with torch.set_grad_enabled(need_grad):
            for s, J in _jacobian_chunks(lin, x, cache):
                mean = f0[s] + J @ (m - theta)
                Sig = torch.einsum("ckp,clp->ckl", J * torch.exp(2 * log_s), J)
                loss = -expected_loglik(lik, y[s], mean, Sig, xi[s])
                if need_grad:
                    loss.backward()
                total += float(loss.detach())
            kl = kl_meanfield(m, log_s, mu0, lam)
            if need_grad:
                kl.backward()
        return torch.tensor(total + float(kl.detach()), dtype=F64)

    history, converged = run_lbfgs([m, log_s], evaluate, max_iter, tol, callback)
    scale = torch.exp(log_s.detach())
    return VIResult(m.detach(), scale, history, history[-1], converged, len(history) - 1)


def predictive_meanfield(
    lin: Linearized, x: Tensor, mean: Tensor, scale: Tensor, joint: bool = False
) -> tuple[Tensor, Tensor]:
    """Logit mean f(x; θ̂) + J(x)(m − θ̂) (c, k) and covariance J(x) diag(s²) J(x)ᵀ (c, k, k) at
    checked inputs x (c, ...), float64; ``joint=True``: the joint covariance over all c points
    (c·k × c·k, point-major) from the whole J(x)."""
    theta, var = lin.theta.to(F64), scale.to(F64).square()
    f0 = lin.forward(x).to(F64)
    if joint:
        J = lin.jacobian_mat(x).to(F64)
        Jf = J.reshape(-1, J.shape[2])
        cov = (Jf * var) @ Jf.T
        return f0 + J @ (mean.to(F64) - theta), 0.5 * (cov + cov.T)
    means, covs = [], []
    for s, J in _jacobian_chunks(lin, x):
        means.append(f0[s] + J @ (mean.to(F64) - theta))
        covs.append(torch.einsum("ckp,clp->ckl", J * var, J))
    return torch.cat(means), torch.cat(covs)


__all__ = ["fit_meanfield", "predictive_meanfield", "diagonal_laplace_scale", "kl_meanfield"]
