"""MAP and Laplace for the linearized classifier in weight space (see :mod:`fntk.classify`)."""

from __future__ import annotations

import math
import warnings

import torch
from linear_operator.utils.linear_cg import linear_cg
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from fntk import persist
from fntk.classify.objective import (
    CG_MAX,
    CG_REFRESH,
    F64,
    FORCING,
    FitInfo,
    SlopeTerms,
    Terms,
    chol,
    eye,
    hessian_derivative,
    line_search,
    lower_solve,
    notify,
    pcg,
    prior_mean_function,
)
from fntk.likelihoods import Likelihood
from fntk.linalg import lanczos_root, minimize
from fntk.linearize import Linearized
from fntk.ntk.cache import kernel_diag_blocks, kernel_matrix
from fntk.operators import GGNOperator


@persist.register("classify.WeightSpace")
class WeightSpace:
    r"""Newton/Laplace on w directly; dense J and Cholesky (``dense=True``) or matrix-free CG and a
    Lanczos root of rank ``rank`` (``dense=False``). See the module docstring."""

    space = "weight"

    def __init__(
        self,
        lin: Linearized,
        x: Tensor,
        y: Tensor,
        lik: Likelihood,
        mu0: Tensor | None,
        dense: bool,
        rank: int = 100,
        cg_tol: float = 1e-12,
        solver: str = "newton",
        batch_size: int | None = None,
    ):
        self.lin, self.x, self.y, self.lik = lin, x, y, lik
        self.n, self.k, self.p = x.shape[0], lin.num_outputs, lin.num_params
        self.dense, self.rank, self.cg_tol = dense, min(rank, self.p), cg_tol
        self.solver, self.batch_size = solver, batch_size
        self.theta = lin.theta.to(F64)
        self.mu0_arg = mu0
        self.mu0 = self.theta.clone() if mu0 is None else mu0
        self.f0 = lin.forward(x).to(F64)
        self.J = lin.jacobian_mat(x).to(F64) if dense else None  # (n, k, p)
        self.w = self.theta.clone()  # start at the source network
        self.lam: float | None = None

    def jv(self, V: Tensor, x: Tensor | None = None) -> Tensor:
        """J V for V (p, r) → (n, k, r) float64."""
        if x is None and self.J is not None:
            return torch.einsum("nkp,pr->nkr", self.J, V)
        x = self.x if x is None else x
        return self.lin.jvp_mat(x, V.to(self.lin.dtype)).to(F64)

    def jtu(self, U: Tensor) -> Tensor:
        """Jᵀ U for U (n, k, r) → (p, r) float64."""
        if self.J is not None:  # as one matmul: einsum copies J into (p, n·k) order first (30x slower)
            return self.J.reshape(-1, self.p).T @ U.reshape(-1, U.shape[2])
        return self.lin.vjp_mat(self.x, U.to(self.lin.dtype)).to(F64)

    def _ggn_mv(self, L: Tensor, V: Tensor) -> Tensor:
        """G V = Jᵀ L Lᵀ J V for V (p, r)."""
        JV = self.jv(V)
        return self.jtu(torch.einsum("nkl,nlr->nkr", torch.einsum("nkm,nlm->nkl", L, L), JV))

    def _precision_chol(self, L: Tensor, lam: float) -> Tensor:
        B = torch.einsum("nkm,nkp->nmp", L, self.J).reshape(-1, self.p)
        P = B.T @ B
        P.diagonal().add_(lam)
        return chol(P)

    def _dense_direction(self, L: Tensor, g: Tensor, gn: float, lam: float) -> Tensor:
        """P⁻¹ g for the Newton step (dense J): CG preconditioned by the last factorisation (the
        previous λ's Laplace precision, or an earlier step's) to the forcing tolerance
        min(FORCING, ‖∇Ψ‖), each iteration two products with J (4 n k p flops) instead of forming
        JᵀHJ (2 n k p² flops); a fresh factorisation when there is none, or when CG misses or
        needed more than CG_REFRESH iterations (it then preconditions the next steps)."""
        pre = getattr(self, "_pre", None)
        if pre is not None:
            eta = max(min(FORCING, gn), self.cg_tol)
            x, res, iters = pcg(lambda v: self._ggn_mv(L, v[:, None])[:, 0] + lam * v, g,
                                lambda v: torch.cholesky_solve(v[:, None], pre)[:, 0], eta, CG_MAX)
            if res <= 2 * eta:
                if iters > CG_REFRESH:
                    self._pre = None
                return x
        self._pre = self._precision_chol(L, lam)
        return torch.cholesky_solve(g[:, None], self._pre)[:, 0]

    def fit(self, lam: float, tol: float, max_iter: int) -> FitInfo:
        """Damped Newton (dense Cholesky or CG), or L-BFGS (``solver="lbfgs"``), to ‖∇_w Ψ‖ ≤ tol,
        warm-started at the last w; then the Laplace factors at the MAP (which precondition the
        next λ's Newton steps, :meth:`_dense_direction`)."""
        self.lam = lam
        if self.solver == "lbfgs":
            info = self._fit_lbfgs(lam, tol, max_iter)
            self._posterior()
            return info
        info = FitInfo()
        for it in range(max_iter + 1):
            f = self.f0 + self.jv((self.w - self.theta)[:, None])[..., 0]
            terms = Terms(self.lik, f, self.y)
            dw0 = self.w - self.mu0
            g = self.jtu(terms.g[..., None])[:, 0] + lam * dw0
            gn = float(g.norm())
            obj = terms.value + 0.5 * lam * float(dw0 @ dw0)
            if info.step(self, it, obj, gn, tol, max_iter):
                break
            if self.dense:
                d = -self._dense_direction(terms.L, g, gn, lam)
            else:

                def mv(V, L=terms.L):
                    return self._ggn_mv(L, V) + lam * V

                # inexact Newton (Eisenstat-Walker forcing): relative residual min(½, √‖g‖),
                # superlinear convergence with few CG steps while far from the optimum
                eta = max(min(0.5, math.sqrt(gn)), self.cg_tol)
                with warnings.catch_warnings():  # an inexact step is fine: the line search follows
                    warnings.simplefilter("ignore", NumericalWarning)
                    iters = min(2 * self.p, 1000)
                    d = -linear_cg(mv, g[:, None], tolerance=eta, max_iter=iters, max_tridiag_iter=1)[:, 0]
            if float(d.norm()) <= 1e-15 * float(self.w.norm()):  # the step is below w's rounding
                break
            df = self.jv(d[:, None])[..., 0]
            a2, ad, dd = float(dw0 @ dw0), float(dw0 @ d), float(d @ d)

            def prior(t, a2=a2, ad=ad, dd=dd):
                return 0.5 * lam * (a2 + 2 * t * ad + t * t * dd)

            t, _, ok = line_search(self.lik, self.y, f, df, prior, float(g @ d), obj)
            if not ok:
                break
            self.w = self.w + t * d
        self._posterior()
        return info

    def _batches(self) -> list[slice]:
        return list(self.lin.chunks(self.n, self.batch_size or self.n))

    def objective_and_grad(self, w: Tensor) -> tuple[float, Tensor]:
        """Ψ(w) and ∇_w Ψ = Σ_b J_bᵀ ∇ℓ(f_b) + λ(w − μ₀), accumulated over mini-batches b of the
        points (f_b = f(x_b; θ̂) + J_b(w − θ̂): one J·v and one Jᵀ·u product per batch, so memory is
        bounded by the batch size, not n)."""
        lam, dw = self.lam, (w - self.theta)[:, None]
        dw0 = w - self.mu0
        value, g = 0.5 * lam * float(dw0 @ dw0), lam * dw0
        for s in self._batches():
            if self.J is not None:
                Jb = self.J[s]
                f = self.f0[s] + torch.einsum("nkp,pr->nkr", Jb, dw)[..., 0]
            else:
                f = self.f0[s] + self.lin.jvp_mat(self.x[s], dw.to(self.lin.dtype)).to(F64)[..., 0]
            t = Terms(self.lik, f, self.y[s], factors=False)
            value += t.value
            if self.J is not None:
                g = g + torch.einsum("nkp,nk->p", Jb, t.g)
            else:
                g = g + self.lin.vjp_mat(self.x[s], t.g[..., None].to(self.lin.dtype)).to(F64)[:, 0]
        return value, g

    def _fit_lbfgs(self, lam: float, tol: float, max_iter: int) -> FitInfo:
        """L-BFGS (:func:`fntk.linalg.minimize`: two-loop recursion, a line search on the directional
        derivative that stays accurate below Ψ's rounding) on the convex Ψ(w), to ‖∇_w Ψ‖ ≤ tol."""
        w, hist, converged = minimize(
            self.objective_and_grad, self.w, tol, max_iter, notify=lambda *a: notify(self, *a)
        )
        self.w = w
        obj, gn = hist[-1]
        return FitInfo(converged, len(hist) - 1, gn, obj, hist)

    def _posterior(self) -> None:
        lam = self.lam
        self.f_star = self.f0 + self.jv((self.w - self.theta)[:, None])[..., 0]
        self.terms = Terms(self.lik, self.f_star, self.y)
        if self.dense:
            self.R = self._pre = self._precision_chol(self.terms.L, lam)
        else:
            self.s, self.U = lanczos_root(_ggn_at(self), self.rank)
            self.s = self.s.clamp_min(0)

    def weight_sqnorm(self) -> float:
        d = self.w - self.mu0
        return float(d @ d)

    def log_det_term(self) -> float:
        """½ log det(I + G/λ): from chol(P) (dense) or the Lanczos eigenvalues (low rank)."""
        if self.dense:
            return float(torch.log(self.R.diagonal()).sum()) - 0.5 * self.p * math.log(self.lam)
        return 0.5 * float(torch.log1p(self.s / self.lam).sum())

    def effective_params(self) -> float:
        """γ = tr(G (G + λI)⁻¹) = p − λ tr(P⁻¹) (dense), Σ s/(s + λ) (low rank)."""
        if self.dense:
            Rinv = lower_solve(self.R, eye(self.p, self.R))
            return float(self.p - self.lam * Rinv.square().sum())
        return float((self.s / (self.s + self.lam)).sum())

    def log_evidence(self) -> float:
        return -(self.terms.value + 0.5 * self.lam * self.weight_sqnorm()) - self.log_det_term()

    def _cov_mv(self, v: Tensor) -> Tensor:
        """P⁻¹ v (v (p,)): Cholesky solve, or the low-rank form with the prior elsewhere."""
        if self.dense:
            return torch.cholesky_solve(v[:, None], self.R)[:, 0]
        Uv = self.U.T @ v
        return self.U @ (Uv / (self.s + self.lam)) + (v - self.U @ Uv) / self.lam

    def slope_terms(self) -> SlopeTerms:
        """The pieces of d log Z / d log λ: exact when dense, with the low-rank covariance otherwise."""
        lam = self.lam
        dH = hessian_derivative(self, -self.jv(self._cov_mv(self.w - self.mu0)[:, None])[..., 0])
        if self.dense:
            V = lower_solve(self.R, self.J.reshape(-1, self.p).T).reshape(self.p, self.n, self.k)
            # Σ_i tr(J_i P⁻¹ J_iᵀ dH_i); two operands per einsum: opt_einsum, when installed,
            # reorders three-operand contractions (last-bit changes)
            T = float(torch.einsum("pnl,pnl->", torch.einsum("pnk,nkl->pnl", V, dH), V))
            # γ = tr(G P⁻¹) = Σ_i ‖L_iᵀ J_i R⁻ᵀ‖² from the same V (no p × p triangular inverse)
            gamma = float(torch.einsum("pnk,nkm->pnm", V, self.terms.L).square().sum())
            return SlopeTerms(gamma, lam * self.weight_sqnorm(), lam * T)
        else:
            JU = self.jv(self.U)
            D = 1.0 / (self.s + lam) - 1.0 / lam
            S = kernel_diag_blocks(self.lin, self.x) / lam + torch.einsum("nkr,nlr->nkl", JU * D, JU)
            T = float(torch.einsum("nkl,nlk->", S, dH))
        return SlopeTerms(self.effective_params(), lam * self.weight_sqnorm(), lam * T)

    def predict(self, x: Tensor, covariance: bool = True, chunk: int = 256) -> tuple[Tensor, Tensor | None]:
        """Mean (c, k) and covariance J* Σ J*ᵀ (c, k, k) of the linearized logits at checked x."""
        lin, k = self.lin, self.k
        means, covs = [], []
        dw = (self.w - self.theta)[:, None]
        for s in lin.chunks(x.shape[0], chunk):
            xs = x[s]
            c = xs.shape[0]
            if self.dense:
                Js = lin.jacobian_mat(xs).to(F64)  # (c, k, p)
                means.append(lin.forward(xs).to(F64) + torch.einsum("ckp,p->ck", Js, dw[:, 0]))
                if covariance:
                    V = lower_solve(self.R, Js.reshape(c * k, self.p).T).reshape(self.p, c, k)
                    covs.append(torch.einsum("pck,pcl->ckl", V, V))
            else:
                means.append(lin.forward(xs).to(F64) + self.jv(dw, xs)[..., 0])
                if covariance:
                    JU = self.jv(self.U, xs)  # (c, k, r)
                    D = 1.0 / (self.s + self.lam) - 1.0 / self.lam
                    covs.append(
                        kernel_diag_blocks(lin, xs) / self.lam + torch.einsum("ckr,clr->ckl", JU * D, JU)
                    )
        return torch.cat(means), (torch.cat(covs) if covariance else None)

    def predict_joint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (m, k) and joint covariance J* Σ J*ᵀ (m·k × m·k, point-major) of the linearized
        logits at checked x (m, ...): Σ = P⁻¹ by the Cholesky factor (dense), or the Lanczos root
        with the prior elsewhere, J*(λ⁻¹I + U D Uᵀ)J*ᵀ, D = (s + λ)⁻¹ − λ⁻¹ (low rank)."""
        lin, m, k = self.lin, x.shape[0], self.k
        dw = (self.w - self.theta)[:, None]
        f0 = lin.forward(x).to(F64)
        if self.dense:
            Js = lin.jacobian_mat(x).to(F64).reshape(m * k, self.p)
            mean = f0 + (Js @ dw).reshape(m, k)
            V = lower_solve(self.R, Js.T)  # (p, m·k)
            cov = V.T @ V
        else:
            mean = f0 + self.jv(dw, x)[..., 0]
            JU = self.jv(self.U, x).reshape(m * k, -1)  # (m·k, r)
            D = 1.0 / (self.s + self.lam) - 1.0 / self.lam
            cov = kernel_matrix(lin, x, None, cache=False) / self.lam + (JU * D) @ JU.T
        return mean, 0.5 * (cov + cov.T)

    def weights(self) -> Tensor:
        return self.w.clone()

    # --- the subspace for VI: top-r right singular vectors U of J(X)
    def subspace(self, r: int) -> tuple[Tensor, Tensor]:
        """(Φ_X = J(X) U (n, k, r'), u* = Uᵀ(w* − μ₀) (r',))."""
        if self.dense:
            _, S, Vh = torch.linalg.svd(self.J.reshape(-1, self.p), full_matrices=False)
            keep = S[:r] > 1e-7 * S[0]
            U = Vh[:r][keep].T
        else:
            jtj = _jtj(self)
            e, U = lanczos_root(jtj, min(r, self.p))
            U = U[:, e > 1e-14 * e[0]]
        self._U = U
        return self.jv(U), U.T @ (self.w - self.mu0)

    def subspace_test(self, x: Tensor, joint: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(m₀(x) (c, k), Φ(x) = J(x) U (c, k, r), K(x_i, x_i) (c, k, k)); ``joint=True``: the
        whole K(x, x) (c·k × c·k) instead of its diagonal blocks."""
        m0 = prior_mean_function(self.lin, x, self.mu0_arg)
        if self.dense:
            Js = self.lin.jacobian_mat(x).to(F64)
            if joint:
                Jf = Js.reshape(-1, self.p)
                return m0, Js @ self._U, Jf @ Jf.T
            return m0, Js @ self._U, Js @ Js.mT
        K = kernel_matrix(self.lin, x, None, cache=False) if joint else kernel_diag_blocks(self.lin, x)
        return m0, self.jv(self._U, x), K

    def subspace_weights(self, u: Tensor) -> Tensor:
        return self.mu0 + self._U @ u


class _Float64Operator:
    """A (p × p) symmetric product V ↦ A V seen by :func:`~fntk.linalg.lanczos_root` as float64
    (shape, dtype, device, ``@``), so that the Lanczos vectors and their reorthogonalisation stay
    in float64 (the Laplace algebra's precision policy) even for a float32 model."""

    def __init__(self, p: int, device: torch.device, product):
        self.shape, self.dtype, self.device, self._product = (p, p), F64, device, product

    def __matmul__(self, V: Tensor) -> Tensor:
        return self._product(V)


def _ggn_at(ws: WeightSpace) -> _Float64Operator:
    """The GGN Jᵀ H(f*) J at the linearized logits f* = f_lin(X; w*): :class:`~fntk.GGNOperator`
    with ``logits=f*`` (the network's products in the model's dtype), its results in float64."""
    G = GGNOperator(ws.lin, ws.x, ws.lik, ws.y, logits=ws.f_star)
    return _Float64Operator(ws.p, ws.theta.device, lambda V: (G @ V.to(ws.lin.dtype)).to(F64))


def _jtj(ws: WeightSpace) -> _Float64Operator:
    """Jᵀ J at the training points (H = I), for the VI subspace."""
    return _Float64Operator(ws.p, ws.theta.device, lambda V: ws.jtu(ws.jv(V)))
