r"""Exact GP regression with the kernel s·J_c(x)J_c(x')ᵀ, in function space and in weight space.

Everything here works in *standardised units*: for each output c (a batch axis of size k'), the
targets are the standardised residuals z (n,) and the model is

    z = b·1 + g(X) + ε,   g ~ GP(0, s·G),  G = J Jᵀ (n × n),  ε ~ N(0, σ² I),

with J = J_c(X) (n × p). Equivalently (weight space) g = J w, w ~ N(0, s I_p). With λ = σ²/s and
A = JᵀJ (p × p), the push-through identity Jᵀ(JJᵀ + λI)⁻¹ = (JᵀJ + λI)⁻¹Jᵀ gives

    posterior mean of w     w̄ = (A + λI)⁻¹ Jᵀ(z − b)            = s Jᵀ α,  α = (sG + σ²I)⁻¹(z − b)
    latent variance at x*   σ² J*(A + λI)⁻¹J*ᵀ                  = s k** − s² k*ᵀ(sG + σ²I)⁻¹ k*
    log|sG + σ²I|           n log σ² + log|I + A/λ|              (matrix determinant lemma)
    (z−b)ᵀ(sG + σ²I)⁻¹(z−b) (‖z−b‖² − (z−b)ᵀJ(A + λI)⁻¹Jᵀ(z−b))/σ²   (Woodbury)

Solvers (the matrix-free one is :class:`fntk.gp._iterative.Iterative`):

- :class:`DenseFunction`: G (n × n) formed once by ``fntk.ntk``; when hyperparameters are learned
  one eigh G = UΛUᵀ makes every marginal-likelihood evaluation O(n); the posterior at the chosen
  values uses a Cholesky factor (backward stable; n³/3 more flops).
- :class:`DenseWeight`: A (p × p) and Jᵀz, Jᵀ1 accumulated over Jacobian row blocks; likewise eigh
  for learning (O(p) per evaluation) and Cholesky of A + λI for the posterior.

Hand-written parts and why: the spectral objectives evaluate the exact marginal likelihood at many
hyperparameters from one factorisation (GPyTorch's ExactMarginalLogLikelihood refactorises at
every optimiser step). The PSD-safe Cholesky is linear_operator's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from linear_operator.utils.cholesky import psd_safe_cholesky
from torch import Tensor

from fntk.gp import _gram
from fntk.linearize import Linearized

LOG2PI = math.log(2 * math.pi)
F64 = torch.float64


@dataclass
class Hyper:
    """Hyperparameters in standardised units, one entry per output: (k',) float64 tensors."""

    scale: Tensor
    noise: Tensor
    constant: Tensor


#: (log s (k',), log σ² (k',), b (k',) or None to profile it out) -> (lml (k',), b (k',))
Objective = Callable[[Tensor, Tensor, "Tensor | None"], "tuple[Tensor, Tensor]"]


# ---------------------------------------------------------------------------------------- factors
class Factor:
    """A batch of SPD matrices M (k', N, N), as L Lᵀ (Cholesky) or U diag(d) Uᵀ (eigen)."""

    def __init__(self, L: Tensor | None = None, U: Tensor | None = None, d: Tensor | None = None):
        self.L, self.U, self.d = L, U, d

    @classmethod
    def cholesky(cls, M: Tensor) -> Factor:
        L, info = torch.linalg.cholesky_ex(M)
        if bool((info > 0).any()):  # not numerically PD: linear_operator's jittered retries
            L = psd_safe_cholesky(M)
        return cls(L=L)

    def solve(self, B: Tensor) -> Tensor:
        """M⁻¹ B for B (k', N, r)."""
        if self.L is not None:
            return torch.cholesky_solve(B, self.L)
        return self.U @ ((self.U.mT @ B) / self.d[..., None])

    def whiten(self, B: Tensor) -> Tensor:
        """W (k', ·, r) with WᵀW = Bᵀ M⁻¹ B."""
        if self.L is not None:
            return torch.linalg.solve_triangular(self.L, B, upper=False)
        return (self.U.mT @ B) / self.d[..., None].sqrt()

    def logdet(self) -> Tensor:
        if self.L is not None:
            return 2 * self.L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return self.d.log().sum(-1)


def _profile_b(q_zz: Tensor, q_z1: Tensor, q_11: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """Quadratic form (z − b1)ᵀM⁻¹(z − b1) = q_zz − 2b q_z1 + b² q_11, b = argmin when None."""
    if b is None:
        b = q_z1 / q_11
    return q_zz - 2 * b * q_z1 + b * b * q_11, b


# --------------------------------------------------------------------------------- dense: function
class DenseFunction:
    """Function space with the dense kernel G_c = J_c J_cᵀ (k', n, n) formed once."""

    space = "function"

    def __init__(self, lin: Linearized, x: Tensor, outputs: Sequence[int], z: Tensor, method: str = "auto"):
        self.lin, self.x, self.outputs, self.method = lin, x, list(outputs), method
        self.z = z  # (k', n) standardised residuals
        self.n = x.shape[0]
        # symmetric by construction (fntk.ntk mirrors the half it computes); Cholesky and eigh
        # read the lower triangle only
        self.G = _gram.dense_kernel(lin, x, None, self.outputs, method).to(F64)
        self._eig: tuple[Tensor, Tensor] | None = None
        self.h: Hyper | None = None

    def prior_scale(self) -> Tensor:
        """Mean prior variance diag(G)/n per output (k',), for initialising s."""
        return self.G.diagonal(dim1=-2, dim2=-1).mean(-1)

    def objective(self) -> Objective:
        """Exact log marginal likelihood at any (s, σ², b) in O(n) after one eigh G = UΛUᵀ."""
        if self._eig is None:
            lam, U = torch.linalg.eigh(self.G)
            self._eig = (lam.clamp_min(0), U)
        lam, U = self._eig
        a = (U.mT @ self.z[..., None])[..., 0]
        c = U.sum(-2)  # Uᵀ1
        n = self.n

        def f(log_s: Tensor, log_noise: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
            d = log_s.exp()[:, None] * lam + log_noise.exp()[:, None]
            quad, b = _profile_b((a * a / d).sum(-1), (a * c / d).sum(-1), (c * c / d).sum(-1), b)
            return -0.5 * (quad + d.log().sum(-1) + n * LOG2PI), b

        return f

    def condition(self, h: Hyper) -> None:
        """Cholesky of sG + σ²I and α = (sG + σ²I)⁻¹(z − b). (Also after an eigh: n³/3 more flops
        buy the backward stability of Cholesky at the chosen hyperparameters.)"""
        self.h = h
        # sG + σ²I overwrites G (one n × n buffer less: 3.2 GB at n = 20,000); conditioning is the
        # last use of G in a fit
        M, self.G = self.G, None
        M.mul_(h.scale[:, None, None]).diagonal(dim1=-2, dim2=-1).add_(h.noise[:, None])
        self.factor = Factor.cholesky(M)
        del M
        self.resid = self.z - h.constant[:, None]
        self.alpha = self.factor.solve(self.resid[..., None])[..., 0]

    def lml(self) -> Tensor:
        quad = (self.resid * self.alpha).sum(-1)
        return -0.5 * (quad + self.factor.logdet() + self.n * LOG2PI)

    def predict(self, xs: Tensor, full_cov: bool) -> tuple[Tensor, Tensor]:
        """Latent mean (k', m) (without b) and variance (k', m) or covariance (k', m, m)."""
        s = self.h.scale[:, None]
        Kxs = _gram.dense_kernel(self.lin, self.x, xs, self.outputs, self.method).to(F64)  # (k', n, m)
        mean = s * (Kxs.mT @ self.alpha[..., None])[..., 0]
        W = self.factor.whiten(Kxs) * s[..., None]  # (k', n, m)
        if full_cov:
            Kss = _gram.dense_kernel(self.lin, xs, None, self.outputs, self.method).to(F64)
            return mean, s[..., None] * Kss - W.mT @ W
        kss = _gram.kernel_diagonal(self.lin, xs, self.outputs).to(F64)
        return mean, s * kss - W.square().sum(-2)


# ----------------------------------------------------------------------------------- dense: weight
class DenseWeight:
    """Weight space with the dense A_c = J_cᵀJ_c (k', p, p), accumulated over Jacobian row blocks."""

    space = "weight"

    def __init__(self, lin: Linearized, x: Tensor, outputs: Sequence[int], z: Tensor):
        self.lin, self.x, self.outputs = lin, x, list(outputs)
        self.z, self.n, self.p = z, x.shape[0], lin.num_params
        rhs = torch.stack([z, torch.ones_like(z)], dim=-1)  # (k', n, 2)
        A, B = _gram.dense_weight_gram(lin, x, self.outputs, rhs)
        self.A = A  # symmetric: accumulated as Σ JᵀJ blocks (Cholesky and eigh read one triangle)
        self.gz, self.g1 = B[..., 0], B[..., 1]  # Jᵀz, Jᵀ1: (k', p)
        self.zz, self.z1 = (z * z).sum(-1), z.sum(-1)
        self._eig: tuple[Tensor, Tensor] | None = None
        self.h: Hyper | None = None

    def prior_scale(self) -> Tensor:
        return self.A.diagonal(dim1=-2, dim2=-1).sum(-1) / self.n  # tr(JᵀJ)/n = mean diag(G)

    def objective(self) -> Objective:
        """Exact log marginal likelihood in O(p) per evaluation after one eigh A = VΘVᵀ."""
        if self._eig is None:
            th, V = torch.linalg.eigh(self.A)
            self._eig = (th.clamp_min(0), V)
        th, V = self._eig
        hz = (V.mT @ self.gz[..., None])[..., 0]
        h1 = (V.mT @ self.g1[..., None])[..., 0]
        n, zz, z1 = self.n, self.zz, self.z1

        def f(log_s: Tensor, log_noise: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
            noise = log_noise.exp()
            lam = (log_noise - log_s).exp()[:, None]
            e = th + lam
            # quadratic forms of M = sG + σ²I by Woodbury: uᵀM⁻¹v = (uᵀv − (Jᵀu)ᵀ(A + λI)⁻¹(Jᵀv))/σ²
            q_zz = (zz - (hz * hz / e).sum(-1)) / noise
            q_z1 = (z1 - (hz * h1 / e).sum(-1)) / noise
            q_11 = (n - (h1 * h1 / e).sum(-1)) / noise
            quad, b = _profile_b(q_zz, q_z1, q_11, b)
            logdet = n * log_noise + torch.log1p(th / lam).sum(-1)
            return -0.5 * (quad + logdet + n * LOG2PI), b

        return f

    def condition(self, h: Hyper) -> None:
        """Cholesky of A + λI and w̄ = (A + λI)⁻¹Jᵀ(z − b)."""
        self.h = h
        lam = h.noise / h.scale
        M, self.A = self.A, None  # A + λI in place: conditioning is the last use of A in a fit
        M.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
        self.factor = Factor.cholesky(M)
        del M
        self.g = self.gz - h.constant[:, None] * self.g1  # Jᵀ(z − b)
        self.wbar = self.factor.solve(self.g[..., None])[..., 0]

    def lml(self) -> Tensor:
        h, n, p = self.h, self.n, self.p
        b, noise, lam = h.constant, h.noise, h.noise / h.scale
        rr = self.zz - 2 * b * self.z1 + b * b * n
        quad = (rr - (self.g * self.wbar).sum(-1)) / noise
        logdet = n * noise.log() + self.factor.logdet() - p * lam.log()
        return -0.5 * (quad + logdet + n * LOG2PI)

    def predict(self, xs: Tensor, full_cov: bool) -> tuple[Tensor, Tensor]:
        Js = _gram._jac(self.lin, xs, self.outputs).to(F64)  # (k', m, p)
        mean = (Js @ self.wbar[..., None])[..., 0]
        W = self.factor.whiten(Js.mT)  # (k', p, m)
        noise = self.h.noise[:, None]
        if full_cov:
            return mean, noise[..., None] * (W.mT @ W)
        return mean, noise * W.square().sum(-2)


# ------------------------------------------------------------------------------ hyperparameters
def optimize(
    objective: Objective,
    init: Hyper,
    learn: frozenset[str],
    noise_floor: float = 1e-6,
    max_iter: int = 200,
) -> Hyper:
    """Maximise the log marginal likelihood over log s, log(σ² − floor) and b (profiled exactly).

    Hyperparameters not in ``learn`` keep their ``init`` values. A coarse grid over the learned
    log-scales picks the start (cheap: each evaluation is O(n), O(p) or O(R)), then L-BFGS with a
    strong-Wolfe line search polishes it. The sum over outputs is separable, so the k' problems are
    solved together.
    """
    k = init.scale.shape[0]
    learn_s, learn_n = "scale" in learn, "noise" in learn
    b_fixed = None if "constant" in learn else init.constant

    def hyper(ls: Tensor, lu: Tensor) -> tuple[Tensor, Tensor]:
        log_s = ls if learn_s else init.scale.log()
        log_noise = torch.log(noise_floor + lu.exp()) if learn_n else init.noise.log()
        return log_s, log_noise

    def value(ls: Tensor, lu: Tensor) -> tuple[Tensor, Tensor]:
        return objective(*hyper(ls, lu), b_fixed)

    ls0 = init.scale.log()
    lu0 = (init.noise - noise_floor).clamp_min(noise_floor * 1e-3).log()
    if not (learn_s or learn_n):
        with torch.no_grad():
            _, b = value(ls0, lu0)
        return Hyper(init.scale, init.noise, b.detach())
    s_grid = [float(d) for d in torch.linspace(-6, 6, 13)] if learn_s else [0.0]
    n_grid = [float(v) for v in torch.linspace(math.log(1e-5), 0.0, 11)] if learn_n else [None]
    best = torch.full((k,), -math.inf, dtype=F64, device=init.scale.device)
    start_s, start_u = ls0.clone(), lu0.clone()
    with torch.no_grad():
        for ds in s_grid:
            for lu in n_grid:
                ls = ls0 + ds
                u = lu0 if lu is None else torch.full_like(lu0, lu)
                val = torch.nan_to_num(value(ls, u)[0], nan=-math.inf)
                better = val > best
                best = torch.where(better, val, best)
                start_s = torch.where(better, ls, start_s)
                start_u = torch.where(better, u, start_u)
    ls_opt, lu_opt = start_s.clone(), start_u.clone()
    for j in range(k):  # one L-BFGS per output: separate convergence tests and line searches
        param = torch.stack([start_s[j], start_u[j]]).clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [param],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure(j=j, param=param, opt=opt) -> Tensor:
            opt.zero_grad()
            ls = torch.cat([ls_opt[:j], param[:1], ls_opt[j + 1 :]])
            lu = torch.cat([lu_opt[:j], param[1:], lu_opt[j + 1 :]])
            loss = -value(ls, lu)[0][j]
            loss.backward()
            return loss

        try:
            opt.step(closure)
        except RuntimeError:  # a failed line search: keep the grid's best point
            continue
        with torch.no_grad():
            ls_opt[j], lu_opt[j] = param[0], param[1]
    with torch.no_grad():
        val, _ = value(ls_opt, lu_opt)
        bad = ~torch.isfinite(val) | (val < best)  # never end worse than the grid's best point
        ls, lu = torch.where(bad, start_s, ls_opt), torch.where(bad, start_u, lu_opt)
        _, b = value(ls, lu)
        log_s, log_noise = hyper(ls, lu)
    return Hyper(log_s.exp(), log_noise.exp(), b.detach())
