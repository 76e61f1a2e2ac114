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
from fntk.gp.means import gls
from fntk.gp.network import kernel_diagonal
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
    """Quadratic form (z − b1)ᵀM⁻¹(z − b1) (k',) and b (k', 1), b = argmin when None: the one-column
    case of :func:`fntk.gp.means.gls`."""
    return gls(q_zz, q_z1[..., None], q_11[..., None, None], None if b is None else b.reshape(-1, 1))


# --------------------------------------------------------------------------------- dense: function
@persist.register("gp.DenseFunction")
class DenseFunction:
    """Function space with the dense kernel G_c = J_c J_cᵀ (k', n, n) formed once.

    The mean's design H (k', n, q) (:mod:`fntk.gp.means`; default the column of ones) enters the
    evidence through the GLS-profiled β; ``G`` and ``eig`` may be passed in when several models
    share one kernel (it is only read: :meth:`condition` builds sG + σ²I in a new buffer)."""

    space = "function"

    def __init__(self, lin: Linearized, x: Tensor, outputs: Sequence[int], z: Tensor, method: str = "auto",
                 H: Tensor | None = None, G: Tensor | None = None,
                 eig: tuple[Tensor, Tensor] | None = None):
        self.lin, self.x, self.outputs, self.method = lin, x, list(outputs), method
        self.z = z  # (k', n) standardised residuals
        self.n = x.shape[0]
        self.H = H if H is not None else torch.ones_like(z)[..., None]
        # symmetric by construction (fntk.ntk mirrors the half it computes); Cholesky and eigh
        # read the lower triangle only
        self.G = G if G is not None else cache.output_kernels(lin, x, None, self.outputs, method).to(F64)
        self._eig: tuple[Tensor, Tensor] | None = eig
        self.h: Hyper | None = None

    def prior_scale(self) -> Tensor:
        """Mean prior variance diag(G)/n per output (k',), for initialising s."""
        return self.G.diagonal(dim1=-2, dim2=-1).mean(-1)

    def point_bytes(self) -> int:
        """Working bytes of :meth:`predict` per test point (cross kernel, whitened copy, temporaries)."""
        return 3 * 8 * len(self.outputs) * self.n

    def eigh(self) -> tuple[Tensor, Tensor]:
        """(Λ (k', n) clamped at 0, U (k', n, n)) with G = UΛUᵀ, computed once."""
        if self._eig is None:
            lam, U = torch.linalg.eigh(self.G)
            self._eig = (lam.clamp_min(0), U)
        return self._eig

    def objective(self) -> Objective:
        """Exact log marginal likelihood at any (s, σ², β) in O(nq²) after one eigh G = UΛUᵀ."""
        lam, U = self.eigh()
        a = (U.mT @ self.z[..., None])[..., 0]
        C = U.mT @ self.H  # (k', n, q)
        n = self.n

        def f(log_s: Tensor, log_noise: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
            d = log_s.exp()[:, None] * lam + log_noise.exp()[:, None]
            Cd = C / d[..., None]
            quad, beta = gls((a * a / d).sum(-1), (Cd * a[..., None]).sum(-2), C.mT @ Cd,
                             None if b is None else b.reshape(-1, 1))
            return -0.5 * (quad + d.log().sum(-1) + n * LOG2PI), beta

        return f

    def loo_parts(self, h: Hyper) -> tuple[Tensor, Tensor, Tensor]:
        """(diag M⁻¹ (k', n), M⁻¹H (k', n, q), α = M⁻¹(z − Hβ) (k', n)) from the eigendecomposition,
        M = sG + σ²I, for the leave-one-out predictive (:mod:`fntk.gp.selection`)."""
        lam, U = self.eigh()
        d = h.scale[:, None] * lam + h.noise[:, None]
        minv = (U * U / d[:, None, :]).sum(-1)
        MinvH = U @ ((U.mT @ self.H) / d[..., None])
        r = self.z - (self.H @ h.beta[..., None])[..., 0]
        alpha = (U @ ((U.mT @ r[..., None])[..., 0] / d)[..., None])[..., 0]
        return minv, MinvH, alpha

    def condition(self, h: Hyper) -> None:
        """Cholesky of sG + σ²I and α = (sG + σ²I)⁻¹(z − Hβ). (Also after an eigh: n³/3 more flops
        buy the backward stability of Cholesky at the chosen hyperparameters.)"""
        self.h = h
        # sG + σ²I in a new buffer, never in G: G may be a cached kernel (fntk.ntk.cached_kernels)
        # or shared by several models (the model choice); conditioning is the last use of G here
        M = self.G * h.scale[:, None, None]
        M.diagonal(dim1=-2, dim2=-1).add_(h.noise[:, None])
        self.G, self._eig = None, None
        self.factor = Factor.cholesky(M)
        del M
        if h.slope is None:
            self.resid = self.z - h.constant[:, None]
        else:
            self.resid = self.z - (self.H @ h.beta[..., None])[..., 0]
        self.alpha = self.factor.solve(self.resid[..., None])[..., 0]

    def lml(self) -> Tensor:
        quad = (self.resid * self.alpha).sum(-1)
        return -0.5 * (quad + self.factor.logdet() + self.n * LOG2PI)

    def predict(self, xs: Tensor, full_cov: bool) -> tuple[Tensor, Tensor]:
        """Latent mean (k', m) (without the mean Hβ) and variance (k', m) or covariance (k', m, m)."""
        s = self.h.scale[:, None]
        Kxs = cache.output_kernels(self.lin, self.x, xs, self.outputs, self.method).to(F64)  # (k', n, m)
        mean = s * (Kxs.mT @ self.alpha[..., None])[..., 0]
        W = self.factor.whiten(Kxs) * s[..., None]  # (k', n, m)
        if full_cov:
            Kss = cache.output_kernels(self.lin, xs, None, self.outputs, self.method).to(F64)
            return mean, s[..., None] * Kss - W.mT @ W
        kss = kernel_diagonal(self.lin, xs, self.outputs).to(F64)
        return mean, s * kss - W.square().sum(-2)


# ----------------------------------------------------------------------------------- dense: weight
@persist.register("gp.DenseWeight")
class DenseWeight:
    """Weight space with the dense A_c = J_cᵀJ_c (k', p, p), accumulated over Jacobian row blocks.

    The mean's design is the column of ones, or (``H`` with q = 2, the "scaled" mean) ones and the
    standardised network output f̃, whose products Jᵀf̃, zᵀf̃, 1ᵀf̃, f̃ᵀf̃ are accumulated as well."""

    space = "weight"

    def __init__(self, lin: Linearized, x: Tensor, outputs: Sequence[int], z: Tensor,
                 H: Tensor | None = None):
        self.lin, self.x, self.outputs = lin, x, list(outputs)
        self.z, self.n, self.p = z, x.shape[0], lin.num_params
        cols = [z, torch.ones_like(z)] + ([] if H is None or H.shape[-1] == 1 else [H[..., 1]])
        rhs = torch.stack(cols, dim=-1)  # (k', n, 2 or 3)
        A, B = gram.dense_weight_gram(lin, x, self.outputs, rhs)
        self.A = A  # symmetric: accumulated as Σ JᵀJ blocks (Cholesky and eigh read one triangle)
        self.gz, self.g1 = B[..., 0], B[..., 1]  # Jᵀz, Jᵀ1: (k', p)
        self.zz, self.z1 = (z * z).sum(-1), z.sum(-1)
        self.f = None if len(cols) == 2 else cols[2]  # f̃ (k', n)
        if self.f is not None:
            self.gf = B[..., 2]
            self.gH = B[..., 1:]  # (k', p, 2)
            Hm = torch.stack(cols[1:], -1)
            self.zH, self.HH = (z[..., None] * Hm).sum(-2), Hm.mT @ Hm  # (k', 2), (k', 2, 2)
        self._eig: tuple[Tensor, Tensor] | None = None
        self.h: Hyper | None = None

    def prior_scale(self) -> Tensor:
        return self.A.diagonal(dim1=-2, dim2=-1).sum(-1) / self.n  # tr(JᵀJ)/n = mean diag(G)

    def point_bytes(self) -> int:
        """Working bytes of :meth:`predict` per test point (Jacobian rows and their whitened copy)."""
        return 3 * 8 * len(self.outputs) * self.p

    def objective(self) -> Objective:
        """Exact log marginal likelihood in O(pq²) per evaluation after one eigh A = VΘVᵀ."""
        if self._eig is None:
            th, V = torch.linalg.eigh(self.A)
            self._eig = (th.clamp_min(0), V)
        th, V = self._eig
        hz = (V.mT @ self.gz[..., None])[..., 0]
        n, zz = self.n, self.zz
        if self.f is None:
            hH, zH, HH = (V.mT @ self.g1[..., None]), self.z1[..., None], zz.new_full((zz.shape[0], 1, 1), n)
        else:
            hH, zH, HH = V.mT @ self.gH, self.zH, self.HH

        def f(log_s: Tensor, log_noise: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
            noise = log_noise.exp()
            lam = (log_noise - log_s).exp()[:, None]
            e = th + lam
            # quadratic forms of M = sG + σ²I by Woodbury: uᵀM⁻¹v = (uᵀv − (Jᵀu)ᵀ(A + λI)⁻¹(Jᵀv))/σ²
            q_zz = (zz - (hz * hz / e).sum(-1)) / noise
            hHe = hH / e[..., None]
            q_zH = (zH - (hHe * hz[..., None]).sum(-2)) / noise[:, None]
            Q = (HH - hH.mT @ hHe) / noise[:, None, None]
            quad, beta = gls(q_zz, q_zH, Q, None if b is None else b.reshape(-1, 1))
            logdet = n * log_noise + torch.log1p(th / lam).sum(-1)
            return -0.5 * (quad + logdet + n * LOG2PI), beta

        return f

    def condition(self, h: Hyper) -> None:
        """Cholesky of A + λI and w̄ = (A + λI)⁻¹Jᵀ(z − Hβ)."""
        self.h = h
        lam = h.noise / h.scale
        M, self.A = self.A, None  # A + λI in place: conditioning is the last use of A in a fit
        self._eig = None
        M.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
        self.factor = Factor.cholesky(M)
        del M
        if h.slope is None:
            self.g = self.gz - h.constant[:, None] * self.g1  # Jᵀ(z − b)
        else:
            self.g = self.gz - (self.gH @ h.beta[..., None])[..., 0]
        self.wbar = self.factor.solve(self.g[..., None])[..., 0]

    def lml(self) -> Tensor:
        h, n, p = self.h, self.n, self.p
        b, noise, lam = h.constant, h.noise, h.noise / h.scale
        if getattr(h, "slope", None) is None:
            rr = self.zz - 2 * b * self.z1 + b * b * n
        else:  # ‖z − Hβ‖² = zᵀz − 2βᵀHᵀz + βᵀHᵀHβ
            beta = h.beta
            bHHb = (beta[..., None, :] @ self.HH @ beta[..., None])[..., 0, 0]
            rr = self.zz - 2 * (beta * self.zH).sum(-1) + bHHb
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
