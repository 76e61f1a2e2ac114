"""MAP and Laplace for the linearized classifier in function space (see :mod:`fntk.classify`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fntk import inputs, persist
from fntk.classify.objective import (
    F64,
    FitInfo,
    SlopeTerms,
    Terms,
    chol,
    eye,
    hessian_derivative,
    line_search,
    lower_solve,
    nll_sum,
    prior_mean_function,
    top_eig,
)
from fntk.likelihoods import Likelihood
from fntk.linearize import Linearized
from fntk.ntk.cache import diag_blocks, kernel_matrix, test_kernels


@persist.register("classify.FunctionSpace")
class FunctionSpace:
    r"""Newton/Laplace on f = m₀ + K̃ a with K̃ = K/λ (n·k × n·k); see the module docstring.

    Args:
        lin: the linearized model; x: checked inputs (n, ...); y: checked targets; lik: likelihood.
        mu0: the prior mean (p,) float64, or ``None`` for θ̂.
    """

    space = "function"

    def __init__(self, lin: Linearized, x: Tensor, y: Tensor, lik: Likelihood, mu0: Tensor | None):
        self.lin, self.x, self.y, self.lik, self.mu0 = lin, x, y, lik, mu0
        self.n, self.k = x.shape[0], lin.num_outputs
        K = kernel_matrix(lin, x)
        self.K = 0.5 * (K + K.T)  # (nk, nk)
        self.m0 = prior_mean_function(lin, x, mu0)  # (n, k)
        self.a = torch.zeros(self.n * self.k, dtype=F64, device=lin.device)
        self.lam: float | None = None

    # --- pieces
    def _f(self, a: Tensor, lam: float) -> Tensor:
        return self.m0 + (self.K @ a).reshape(self.n, self.k) / lam

    def _LtKL(self, L: Tensor, lam: float) -> Tensor:
        """Lᵀ K̃ L: (n·m × n·m) for the block-diagonal L (n, k, m)."""
        n, k, m = L.shape
        K4 = self.K.reshape(n, k, n, k)
        T = torch.einsum("icjd,jdb->icjb", K4, L)
        return torch.einsum("ica,icjb->iajb", L, T).reshape(n * m, n * m) / lam

    @staticmethod
    def _Lt(L: Tensor, M: Tensor) -> Tensor:
        """Lᵀ M for M (n·k, q) → (n·m, q)."""
        n, k, m = L.shape
        return torch.einsum("nkm,nkq->nmq", L, M.reshape(n, k, -1)).reshape(n * m, -1)

    @staticmethod
    def _Lx(L: Tensor, M: Tensor) -> Tensor:
        """L M for M (n·m, q) → (n·k, q)."""
        n, k, m = L.shape
        return torch.einsum("nkm,nmq->nkq", L, M.reshape(n, m, -1)).reshape(n * k, -1)

    def _objective(self, a: Tensor, lam: float, terms: Terms | None = None) -> float:
        f = self._f(a, lam)
        nll = terms.value if terms is not None else nll_sum(self.lik, f, self.y)
        return nll + 0.5 * float(a @ (self.K @ a)) / lam

    def grad_norm(self, terms: Terms, lam: float) -> float:
        """‖∇_w Ψ‖ = ‖Jᵀ(g + a)‖ = √((g + a)ᵀ K (g + a))."""
        v = terms.g.reshape(-1) + self.a
        return math.sqrt(max(float(v @ (self.K @ v)), 0.0))

    # --- MAP
    def fit(self, lam: float, tol: float, max_iter: int) -> FitInfo:
        """Damped Newton in f to ‖∇_w Ψ‖ ≤ tol (warm start: f is kept when λ changes)."""
        if self.lam is not None and self.lam != lam:
            self.a = self.a * (lam / self.lam)  # same f = m₀ + K a / λ
        self.lam = lam
        info = FitInfo()
        for it in range(max_iter + 1):
            f = self._f(self.a, lam)
            terms = Terms(self.lik, f, self.y)
            gn = self.grad_norm(terms, lam)
            obj = self._objective(self.a, lam, terms)
            if info.step(self, it, obj, gn, tol, max_iter):
                break
            L = terms.L
            h = (f - self.m0).reshape(-1)
            b = self._Lx(L, self._Lt(L, h[:, None]))[:, 0] - terms.g.reshape(-1)
            R = chol(eye(L.shape[0] * L.shape[2], L) + self._LtKL(L, lam))
            Kb = self.K @ b / lam
            c = torch.cholesky_solve(self._Lt(L, Kb[:, None]), R)
            d = b - self._Lx(L, c)[:, 0] - self.a
            Kd = self.K @ d
            df = Kd.reshape(self.n, self.k) / lam
            aKa, aKd, dKd = float(self.a @ (self.K @ self.a)), float(self.a @ Kd), float(d @ Kd)
            slope = float((terms.g.reshape(-1) + self.a) @ Kd) / lam
            if float(df.norm()) <= 1e-15 * float(f.norm()):  # the step is below f's rounding
                break

            def prior(t, aKa=aKa, aKd=aKd, dKd=dKd):
                return 0.5 * (aKa + 2 * t * aKd + t * t * dKd) / lam

            t, _, ok = line_search(self.lik, self.y, f, df, prior, slope, obj)
            if not ok:  # no decrease possible at this precision: stationary to rounding
                break
            self.a = self.a + t * d
        self._posterior()
        return info

    def _posterior(self) -> None:
        """Factors of the Laplace posterior at the current a: L at f*, R = chol(I + Lᵀ K̃ L)."""
        lam = self.lam
        self.f_star = self._f(self.a, lam)
        self.terms = Terms(self.lik, self.f_star, self.y)
        L = self.terms.L
        self.R = chol(eye(L.shape[0] * L.shape[2], L) + self._LtKL(L, lam))

    # --- evidence
    def weight_sqnorm(self) -> float:
        """‖w* − μ₀‖² = aᵀ K a / λ²."""
        return float(self.a @ (self.K @ self.a)) / self.lam**2

    def log_det_term(self) -> float:
        """½ log det(I + G/λ) = ½ log det(I + Lᵀ K̃ L) (Sylvester)."""
        return float(torch.log(self.R.diagonal()).sum())

    def effective_params(self) -> float:
        """γ = tr(G (G + λI)⁻¹) = n·m − tr(B⁻¹)."""
        Rinv = lower_solve(self.R, eye(self.R.shape[0], self.R))
        return float(self.R.shape[0] - Rinv.square().sum())

    def log_evidence(self) -> float:
        return -(self.terms.value + 0.5 * self.lam * self.weight_sqnorm()) - self.log_det_term()

    def slope_terms(self) -> SlopeTerms:
        """The pieces of d log Z / d log λ, exactly (see :func:`optimize_prior_precision`); the diagonal
        blocks of S = J P⁻¹ Jᵀ = K̃ − Vᵀ V, V = R⁻¹ Lᵀ K̃, cost one triangular solve with n·k
        right-hand sides."""
        lam, L, R, n, k = self.lam, self.terms.L, self.R, self.n, self.k
        Kt = self.K / lam
        Kta = Kt @ self.a  # S a = K̃ a − K̃ L B⁻¹ Lᵀ K̃ a;  J dw*/dλ = −S a / λ
        Sa = Kta - Kt @ self._Lx(L, torch.cholesky_solve(self._Lt(L, Kta[:, None]), R))[:, 0]
        dH = hessian_derivative(self, -Sa.reshape(n, k) / lam)
        V3 = lower_solve(R, self._Lt(L, Kt)).reshape(R.shape[0], n, k)
        S = diag_blocks(Kt, n, k) - torch.einsum("jnk,jnl->nkl", V3, V3)
        T = float(torch.einsum("nkl,nlk->", S, dH))
        return SlopeTerms(self.effective_params(), lam * self.weight_sqnorm(), lam * T)

    # --- predictive
    def predict(self, x: Tensor, covariance: bool = True, chunk: int = 256) -> tuple[Tensor, Tensor | None]:
        """Mean (c, k) and covariance (c, k, k) of the linearized logits at checked x (c, ...)."""
        lam, k, L = self.lam, self.k, self.terms.L
        means, covs = [], []
        for s, Ks, Kss in test_kernels(self.lin, x, self.x):
            c = s.stop - s.start
            Ks, Kss = Ks / lam, Kss / lam  # (ck, nk), (c, k, k)
            means.append(prior_mean_function(self.lin, x[s], self.mu0) + (Ks @ self.a).reshape(c, k))
            if covariance:
                V = lower_solve(self.R, self._Lt(L, Ks.T)).reshape(-1, c, k)  # (nm, c, k)
                covs.append(Kss - torch.einsum("jck,jcl->ckl", V, V))
        return torch.cat(means), (torch.cat(covs) if covariance else None)

    def _joint_kernels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(K(x, X) (m·k × n·k), K(x, x) (m·k × m·k)), float64 point-major, from one kernel of the
        concatenation [x; X] (the per-point work of :func:`fntk.ntk` done once per point)."""
        mk = x.shape[0] * self.k
        K = kernel_matrix(self.lin, inputs.cat([x, self.x]), None, cache=False)
        return K[:mk, mk:], K[:mk, :mk]

    def predict_joint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Mean (m, k) and joint covariance (m·k × m·k, point-major) of the linearized logits at
        checked x (m, ...): K̃** − Vᵀ V with V = R⁻¹ Lᵀ K̃(X, x*), K̃ = K/λ (its (k × k) diagonal
        blocks are :meth:`predict`'s covariances)."""
        lam, L, m, k = self.lam, self.terms.L, x.shape[0], self.k
        Ks, Kss = self._joint_kernels(x)
        Ks, Kss = Ks / lam, Kss / lam
        mean = prior_mean_function(self.lin, x, self.mu0) + (Ks @ self.a).reshape(m, k)
        V = lower_solve(self.R, self._Lt(L, Ks.T))  # (n·m', m·k)
        cov = Kss - V.T @ V
        return mean, 0.5 * (cov + cov.T)

    # --- the subspace for VI: top-r eigenvectors of K (J U = Q_r diag(√e_r))
    def subspace(self, r: int) -> tuple[Tensor, Tensor]:
        """(Φ_X = J(X) U (n, k, r'), u* = Uᵀ(w* − μ₀) (r',)), r' ≤ r dropping null directions."""
        e, Q = top_eig(self.K, r)
        self._sub = (e, Q)
        Phi = (Q * e.sqrt()).reshape(self.n, self.k, -1)
        return Phi, e.sqrt() * (Q.T @ self.a) / self.lam

    def subspace_test(self, x: Tensor, joint: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(m₀(x) (m, k), Φ(x) = J(x) U = K(x, X) Q_r diag(e_r^-½) (m, k, r), K(x_i, x_i) (m, k, k));
        ``joint=True``: the whole K(x, x) (m·k × m·k) instead of its diagonal blocks."""
        e, Q = self._sub
        if joint:
            Ks, Kss = self._joint_kernels(x)
            Phis = (Ks @ Q / e.sqrt()).reshape(x.shape[0], self.k, -1)
            return prior_mean_function(self.lin, x, self.mu0), Phis, Kss
        Phis, Kss = [], []
        for s, Ks, Kd in test_kernels(self.lin, x, self.x):
            Phis.append((Ks @ Q / e.sqrt()).reshape(s.stop - s.start, self.k, -1))
            Kss.append(Kd)
        return prior_mean_function(self.lin, x, self.mu0), torch.cat(Phis), torch.cat(Kss)

    def subspace_weights(self, u: Tensor) -> Tensor:
        """w = μ₀ + U u = μ₀ + Jᵀ Q_r diag(e_r^-½) u: (p,)."""
        e, Q = self._sub
        return self.weights(Q @ (u / e.sqrt()) * self.lam)

    def weights(self, a: Tensor | None = None) -> Tensor:
        """w = μ₀ + Jᵀ a / λ: (p,) float64 (one vjp)."""
        a = self.a if a is None else a
        U = (a / self.lam).reshape(self.n, self.k, 1).to(self.lin.dtype)
        mu0 = self.lin.theta.to(F64) if self.mu0 is None else self.mu0
        return mu0 + self.lin.vjp_mat(self.x, U)[:, 0].to(F64)
