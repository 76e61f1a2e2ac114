r"""Hyperpriors of the NTK-GP models (MAP-II) and the Laplace approximation of a model's evidence.

Every hyperparameter θ > 0 gets a log-normal prior, log θ ~ N(log θ₀, w²), in the standardised
units of the GP (residual variance 1):

    kernel scales s, s_l     θ₀ = 1/mean diag(J Jᵀ) (the prior variance explains the residuals), w = 10
    input-kernel scale s_in  θ₀ = 1/2, w = 10
    lengthscales ℓ_d         θ₀ = median pairwise distance along d, w = 1.5
    noise σ²                 θ₀ = mean σ²_src(X)/σ_y² when the net has a variance output (the
                             source net's own noise, w = 1), else θ₀ = 1e-3, w = 3 (about
                             log-uniform over the allowed 1e-6 … 1; on the 120 sine tasks it gave
                             test NLL −0.71 / −0.56 against 0.07 / 0.22 with θ₀ = 0.1, w = 2:
                             python -m fntk_bench.model_choice_sine)
    noise multiplier c       θ₀ = 1 (trust the source variance), w = 1

Wide on the scales; what they mainly do is keep σ² off the 1e-6 floor that the plain evidence
reaches on ≤ 20 points (an interpolating, over-confident fit) without holding it far above the
data's own noise.

The evidence of a model with hyperparameters u (log-values) and mean coefficients β (profiled in the
fit, :mod:`fntk.gp.means`): β is integrated exactly under β ~ N(0, τ²I) (τ = 1 in standardised
units), u by Laplace's method around the fitted û:

    log p(y | model) ≈ log N(z | 0, M + τ²HHᵀ) + log p(û) + (q_u/2) log 2π − ½ log det A_u,
    log N(z | 0, M + τ²HHᵀ) = ℓ(û) + ½ β̂ᵀ[Q(Q + I/τ²)⁻¹Q − Q]β̂ − ½ log det(I + τ²Q),

with ℓ the profiled log marginal likelihood, Q = HᵀM⁻¹H and β̂ = Q⁻¹HᵀM⁻¹z (Woodbury and the
determinant lemma), and A_u = −∇²_u[ℓ + log p] at û (central differences of the autograd
gradient; the profiled objective's curvature stands in for the integrated one's). Eigenvalues of
A_u are floored at :data:`CURVATURE_FLOOR`. Integrating β instead of a Laplace step matters when
the constant is poorly identified (the NTK's bias directions make a constant nearly free: β̂ is then
large and uncertain, and a Gaussian at β̂ would charge its full prior density there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LOG2PI = math.log(2 * math.pi)
SCALE_WIDTH = 10.0
LENGTHSCALE_WIDTH = 1.5
NOISE_WIDTH, INFORMED_NOISE_WIDTH = 3.0, 1.0
MULTIPLIER_WIDTH = 1.0
INPUT_SCALE_CENTER = 0.5
DEFAULT_NOISE_CENTER = 1e-3
BETA_WIDTH = 1.0
CURVATURE_FLOOR = 1e-8
FD_STEP = 1e-4


def log_normal(u: Tensor, center: Tensor, width: Tensor | float) -> Tensor:
    """Σ log N(u_i; center_i, width_i²) over the last axis (u = log θ)."""
    width = torch.as_tensor(width, dtype=u.dtype, device=u.device)
    r = (u - center) / width
    return (-0.5 * r * r - width.log() - 0.5 * LOG2PI).sum(-1)


def noise_center(source_noise: Tensor | None) -> tuple[float, float]:
    """(θ₀, w) of the noise prior: the source variance's mean (standardised) or the default."""
    if source_noise is None:
        return DEFAULT_NOISE_CENTER, NOISE_WIDTH
    return float(source_noise.mean()), INFORMED_NOISE_WIDTH


def hessian(fn: Callable[[Tensor], Tensor], u: Tensor, step: float = FD_STEP) -> Tensor:
    """∇²fn at u (q,) by central differences of the autograd gradient, symmetrised: (q, q)."""

    def grad(v: Tensor) -> Tensor:
        v = v.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(v), v)
        return g

    q = u.shape[0]
    cols = []
    for i in range(q):
        e = torch.zeros_like(u)
        e[i] = step
        cols.append((grad(u + e) - grad(u - e)) / (2 * step))
    Hm = torch.stack(cols, -1)
    return 0.5 * (Hm + Hm.T)


def integrated_beta(lml: float, beta: Tensor, Q: Tensor, width: float = BETA_WIDTH) -> float:
    """log N(z | 0, M + τ²HHᵀ) from the profiled ℓ, β̂ (q,) and Q (q, q) (module docstring)."""
    eye = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
    Qs = 0.5 * (Q + Q.T)
    inner = Qs @ torch.linalg.solve(Qs + eye / width**2, Qs) - Qs
    return float(lml + 0.5 * beta @ inner @ beta - 0.5 * torch.logdet(eye + width**2 * Qs))


def laplace_evidence(
    lml: float, log_prior: float, fn: Callable[[Tensor], Tensor], u: Tensor, beta: Tensor, Q: Tensor
) -> float:
    """The evidence of the module docstring in standardised units.

    Args: lml = ℓ(û), log_prior = log p(û); fn the differentiable u ↦ ℓ(u) + log p(u) (0-d);
    u = û (q_u,); beta = β̂ (q_β,); Q = HᵀM⁻¹H (q_β, q_β) at û."""
    logdet_u = 0.0
    if u.shape[0]:
        A = -hessian(fn, u)
        logdet_u = float(torch.linalg.eigvalsh(A).clamp_min(CURVATURE_FLOOR).log().sum())
    return integrated_beta(lml, beta, Q) + log_prior + 0.5 * u.shape[0] * LOG2PI - 0.5 * logdet_u


__all__ = ["log_normal", "noise_center", "hessian", "integrated_beta", "laplace_evidence", "SCALE_WIDTH",
           "LENGTHSCALE_WIDTH",
           "NOISE_WIDTH", "INFORMED_NOISE_WIDTH", "MULTIPLIER_WIDTH", "INPUT_SCALE_CENTER"]
