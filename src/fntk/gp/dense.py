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

Solvers (the matrix-free one is :class:`fntk.gp.iterative.Iterative`; the hyperparameter search
is :mod:`fntk.gp.hyper`):

- :class:`DenseFunction`: G (n × n) formed once by ``fntk.ntk``; when hyperparameters are learned
  one eigh G = UΛUᵀ makes every marginal-likelihood evaluation O(n); the posterior at the chosen
  values uses a Cholesky factor (backward stable; n³/3 more flops).
- :class:`DenseWeight`: A (p × p) and Jᵀz, Jᵀ1 accumulated over Jacobian row blocks; likewise eigh
  for learning (O(p) per evaluation) and Cholesky of A + λI for the posterior.

Hand-written parts and why: the spectral objectives evaluate the exact marginal likelihood at many
hyperparameters from one factorisation (GPyTorch's ExactMarginalLogLikelihood refactorises at
every optimiser step). Factorisations use fntk's one Cholesky (:func:`fntk.linalg.safe_cholesky`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fntk import persist
from fntk.gp.hyper import F64, LOG2PI, Hyper, Objective
from fntk.linalg import safe_cholesky
from fntk.linearize import Linearized
from fntk.ntk import cache
from fntk.operators import gram


# ---------------------------------------------------------------------------------------- factors
@persist.register("gp.Factor")
class Factor:
    """A batch of SPD matrices M (k', N, N), as L Lᵀ (Cholesky) or U diag(d) Uᵀ (eigen)."""

    def __init__(self, L: Tensor | None = None, U: Tensor | None = None, d: Tensor | None = None):
        self.L, self.U, self.d = L, U, d

    @classmethod
    def cholesky(cls, M: Tensor, what: str = "the GP system matrix") -> Factor:
        return cls(L=safe_cholesky(M, what))

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


def profile_b(q_zz: Tensor, q_z1: Tensor, q_11: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """Quadratic form (z − b1)ᵀM⁻¹(z − b1) = q_zz − 2b q_z1 + b² q_11, b = argmin when None."""
    if b is None:
        b = q_z1 / q_11
    return q_zz - 2 * b * q_z1 + b * b * q_11, b


# --------------------------------------------------------------------------------- dense: function
@persist.register("gp.DenseFunction")
class DenseFunction:
    """Function space with the dense kernel G_c = J_c J_cᵀ (k', n, n) formed once."""

    space = "function"

    def __init__(self, lin: Linearized, x: Tensor, outputs: Sequence[int], z: Tensor, method: str = "auto"):
        self.lin, self.x, self.outputs, self.method = lin, x, list(outputs), method
        self.z = z  # (k', n) standardised residuals
        self.n = x.shape[0]
        # symmetric by construction (fntk.ntk mirrors the half it computes); Cholesky and eigh
        # read the lower triangle only
        self.G = cache.output_kernels(lin, x, None, self.outputs, method).to(F64)
        self._eig: tuple[Tensor, Tensor] | None = None
        self.h: Hyper | None = None

    def prior_scale(self) -> Tensor:
        """Mean prior variance diag(G)/n per output (k',), for initialising s."""
        return self.G.diagonal(dim1=-2, dim2=-1).mean(-1)

    def point_bytes(self) -> int:
        """Working bytes of :meth:`predict` per test point (cross kernel, whitened copy, temporaries)."""
        return 3 * 8 * len(self.outputs) * self.n

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
            quad, b = profile_b((a * a / d).sum(-1), (a * c / d).sum(-1), (c * c / d).sum(-1), b)
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
        Kxs = cache.output_kernels(self.lin, self.x, xs, self.outputs, self.method).to(F64)  # (k', n, m)
        mean = s * (Kxs.mT @ self.alpha[..., None])[..., 0]
        W = self.factor.whiten(Kxs) * s[..., None]  # (k', n, m)
        if full_cov:
            Kss = cache.output_kernels(self.lin, xs, None, self.outputs, self.method).to(F64)
            return mean, s[..., None] * Kss - W.mT @ W
        kss = cache.kernel_diagonal(self.lin, xs, self.outputs).to(F64)
        return mean, s * kss - W.square().sum(-2)


# ----------------------------------------------------------------------------------- dense: weight
@persist.register("gp.DenseWeight")
class DenseWeight:
    """Weight space with the dense A_c = J_cᵀJ_c (k', p, p), accumulated over Jacobian row blocks."""

    space = "weight"

    def __init__(self, lin: Linearized, x: Tensor, outputs: Sequence[int], z: Tensor):
        self.lin, self.x, self.outputs = lin, x, list(outputs)
        self.z, self.n, self.p = z, x.shape[0], lin.num_params
        rhs = torch.stack([z, torch.ones_like(z)], dim=-1)  # (k', n, 2)
        A, B = gram.dense_weight_gram(lin, x, self.outputs, rhs)
        self.A = A  # symmetric: accumulated as Σ JᵀJ blocks (Cholesky and eigh read one triangle)
        self.gz, self.g1 = B[..., 0], B[..., 1]  # Jᵀz, Jᵀ1: (k', p)
        self.zz, self.z1 = (z * z).sum(-1), z.sum(-1)
        self._eig: tuple[Tensor, Tensor] | None = None
        self.h: Hyper | None = None

    def prior_scale(self) -> Tensor:
        return self.A.diagonal(dim1=-2, dim2=-1).sum(-1) / self.n  # tr(JᵀJ)/n = mean diag(G)

    def point_bytes(self) -> int:
        """Working bytes of :meth:`predict` per test point (Jacobian rows and their whitened copy)."""
        return 3 * 8 * len(self.outputs) * self.p

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
            quad, b = profile_b(q_zz, q_z1, q_11, b)
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
        Js = gram.output_jacobian(self.lin, xs, self.outputs).to(F64)  # (k', m, p)
        mean = (Js @ self.wbar[..., None])[..., 0]
        W = self.factor.whiten(Js.mT)  # (k', p, m)
        noise = self.h.noise[:, None]
        if full_cov:
            return mean, noise[..., None] * (W.mT @ W)
        return mean, noise * W.square().sum(-2)


__all__ = ["Factor", "DenseFunction", "DenseWeight", "profile_b"]
