"""The objective shared by the MAP/Laplace backends: likelihood terms, the prior mean function, the
Armijo line search, the preconditioned CG of the Newton steps, fit records."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import jvp

from fntk import persist
from fntk.likelihoods import Likelihood
from fntk.linalg import lanczos_root, safe_cholesky
from fntk.linearize import Linearized

F64 = torch.float64
#: Newton steps by preconditioned CG (last-layer and dense weight-space backends): the forcing
#: tolerance min(FORCING, ‖∇Ψ‖) relative (quadratic convergence near the MAP; far from it the line
#: search, not the inexact solve, limits the steps: on the digit transfer 0.1 and 0.01 saved 1-4
#: Newton steps per λ but cost more CG iterations); CG_MAX iterations before a fresh factorisation
#: replaces CG; more than CG_REFRESH (about the cost of one factorisation: last layer, m = 500, a
#: softmax factorisation 46 ms, a preconditioned CG iteration 1.1-1.5 ms) refresh the
#: preconditioner for the next step (12 refreshed one step before convergence at a fixed λ, a third
#: factorisation for nothing)
FORCING, CG_MAX, CG_REFRESH = 0.5, 60, 30


@persist.register("classify.Terms")
class Terms:
    """ℓ(f) = Σ_i nll_i, its gradient g (n, k) and the Hessian root L (n, k, m) at f (n, k)."""

    def __init__(self, lik: Likelihood, f: Tensor, y: Tensor, factors: bool = True):
        self.f = f
        # first-order solvers (L-BFGS) need only the value and g
        nll, self.g, L = lik.pure_terms(f, y, root=factors)
        self.value = float(nll.sum())
        if factors:
            self.L = L


def nll_sum(lik: Likelihood, f: Tensor, y: Tensor) -> float:
    return float(lik.pure_nll(f, y).sum())


def line_search(
    lik: Likelihood,
    y: Tensor,
    f: Tensor,
    df: Tensor,
    prior: Callable[[float], float],
    slope: float,
    start: float,
) -> tuple[float, float, bool]:
    """Armijo backtracking on t ↦ ℓ(f + t df) + prior(t) from t = 1: (t, new value, accepted)."""
    t = 1.0
    for _ in range(40):
        val = nll_sum(lik, f + t * df, y) + prior(t)
        if math.isfinite(val) and val <= start + 1e-4 * t * slope:
            return t, val, True
        t *= 0.5
    return 0.0, start, False


@persist.register("classify.FitInfo")
@dataclass
class FitInfo:
    """How the MAP solve ended: ``converged`` when ‖∇_w Ψ‖ ≤ tol."""

    converged: bool = False
    n_iter: int = 0
    grad_norm: float = float("inf")
    objective: float = float("nan")
    history: list = field(default_factory=list)

    def step(self, backend: object, it: int, obj: float, gn: float, tol: float, max_iter: int) -> bool:
        """Record Newton step ``it`` (objective Ψ, ‖∇Ψ‖), tell the user's callback (:func:`notify`);
        True when the solve stops here: converged (‖∇Ψ‖ ≤ tol) or out of iterations."""
        notify(backend, it, obj, gn)
        self.history.append((obj, gn))
        self.n_iter, self.grad_norm, self.objective = it, gn, obj
        self.converged = gn <= tol
        return self.converged or it == max_iter


@dataclass(frozen=True)
class SlopeTerms:
    """The three pieces of the evidence's slope d log Z / d log λ = ½(γ − λ‖w* − μ₀‖² − λT)
    (:func:`fntk.classify.evidence.optimize_prior_precision`), each kept because the λ search models
    them separately."""

    gamma: float
    lam_sq: float
    lam_t: float

    @property
    def slope(self) -> float:
        return 0.5 * (self.gamma - self.lam_sq - self.lam_t)


def pcg(
    matmul: Callable[[Tensor], Tensor],
    b: Tensor,
    precondition: Callable[[Tensor], Tensor],
    tol: float,
    max_iter: int,
) -> tuple[Tensor, float, int]:
    """Preconditioned conjugate gradients for the SPD system M x = b (b, x: (N,)), from x = 0, until
    the recursive residual is ≤ tol·‖b‖ (no minimum number of iterations: with a preconditioner
    from a nearby Newton system one or two iterations often suffice). Returns (x, the true relative
    residual ‖b − M x‖/‖b‖ (one extra product), iterations), so that a caller can fall back to a
    direct solve or refresh its preconditioner."""
    bn = float(b.norm())
    x = torch.zeros_like(b)
    if bn == 0.0:
        return x, 0.0, 0
    r = b.clone()
    z = precondition(r)
    d, rz = z, float(r @ z)
    it = 0
    while it < max_iter:
        it += 1
        Md = matmul(d)
        dMd = float(d @ Md)
        if not dMd > 0:  # rounding at convergence, or a non-SPD operator: stop here
            break
        a = rz / dMd
        x = x + a * d
        r = r - a * Md
        if float(r.norm()) <= tol * bn:
            break
        z = precondition(r)
        rz, rz_old = float(r @ z), rz
        d = z + (rz / rz_old) * d
    return x, float((b - matmul(x)).norm()) / bn, it


def lower_solve(R: Tensor, B: Tensor) -> Tensor:
    return torch.linalg.solve_triangular(R, B, upper=False)


def eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def chol(A: Tensor) -> Tensor:
    """Cholesky with a tiny escalating jitter (warned, with the amount) for matrices that are PD
    only up to rounding; see :func:`fntk.linalg.safe_cholesky`."""
    return safe_cholesky(A, "the Laplace precision matrix", start=1e-12, tries=10)


def notify(backend: object, step: int, objective: float, grad_norm: float) -> None:
    """Call the user's per-Newton-step callback (``LinearizedClassifier.fit(callback=...)``)."""
    cb = getattr(backend, "callback", None)
    if cb is not None:
        cb({"stage": "map", "step": step, "objective": objective, "grad_norm": grad_norm})


def top_eig(K: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r eigenpairs (descending) of a symmetric PSD K, dropping numerically null ones: dense
    ``eigh`` for N ≤ 3000, else Lanczos (:func:`~fntk.linalg.lanczos_root`)."""
    N = K.shape[0]
    r = min(r, N)
    if N <= 3000 or r > N // 4:
        e, Q = torch.linalg.eigh(K)
        e, Q = e.flip(0)[:r], Q.flip(1)[:, :r]
    else:
        e, Q = lanczos_root(K, r, num_iter=min(N, 2 * r + 50))
    keep = e > 1e-10 * e[0].clamp_min(1e-300)
    return e[keep], Q[:, keep]


def hessian_derivative(b, df: Tensor) -> Tensor:
    """DH_i[df_i]: the directional derivative (n, k, k) of the likelihood Hessians at f* along df
    = J dw*/dλ (torch.func.jvp of the likelihood's Hessian)."""
    lik, y = b.lik, b.y
    return jvp(lambda f: lik.pure_hessian(f, y), (b.f_star,), (df,))[1]


def prior_mean_function(lin: Linearized, x: Tensor, mu0: Tensor | None) -> Tensor:
    """m₀(x) = f(x; θ̂) + J(x)(μ₀ − θ̂): (n, k) float64 (μ₀ = None means μ₀ = θ̂)."""
    f = lin.forward(x).to(F64)
    if mu0 is None:
        return f
    d = (mu0 - lin.theta.to(F64)).to(lin.dtype)
    return f + lin.jvp_mat(x, d[:, None])[..., 0].to(F64)
