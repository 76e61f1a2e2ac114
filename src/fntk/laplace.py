r"""MAP and Laplace inference for a linearized classifier, in function space or in weight space.

The model (n points, k outputs, p selected parameters):

    logits  f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂),      prior  w ~ N(μ₀, λ⁻¹ I_p),

μ₀ = θ̂ ("theta") or 0 ("zero"), and a likelihood with per-point NLL ℓ_i(f_i) whose output Hessian
is H_i = L_i L_iᵀ (k × m factors from :meth:`fntk.likelihoods.Likelihood.hessian_factors`). The
negative log posterior

    Ψ(w) = Σ_i ℓ_i(f_lin(x_i; w)) + (λ/2) ‖w − μ₀‖²

is convex, and its Hessian Jᵀ H(f_lin(w)) J + λ I is *exact* (f_lin is linear in w). So damped
Newton (with an Armijo backtracking line search; undamped steps can diverge) converges
quadratically, and the Laplace approximation q(w) = N(w*, (JᵀH(f*)J + λI)⁻¹) is the posterior's
curvature at the MAP, with H evaluated at the *linearized* logits f* = f_lin(x; w*).

Three backends (all internal algebra in float64):

- :class:`FunctionSpace` (n·k small, p large). By the representer theorem w* − μ₀ = Jᵀ a / λ, so
  with m₀(x) = f(x; θ̂) + J(x)(μ₀ − θ̂) and K̃ = J Jᵀ / λ (n·k × n·k, the empirical NTK) the logits
  are f = m₀ + K̃ a. Newton in f is Rasmussen & Williams' Algorithm 3.3 with the factors L:
  B = I + Lᵀ K̃ L, a_new = b − L B⁻¹ Lᵀ K̃ b, b = H h − ∇ℓ, h = f − m₀. The predictive at x*:
  mean m₀* + K̃*ₓ a, covariance K̃** − K̃*ₓ L B⁻¹ Lᵀ K̃ₓ* (Woodbury; exact).
- :class:`WeightSpace` with ``dense=True`` (n·k ≫ p, p up to a few thousand): the explicit J
  (n, k, p), Newton with a Cholesky of P = JᵀHJ + λI, covariance P⁻¹.
- :class:`WeightSpace` with ``dense=False`` (p and n·k both large): matrix-free Newton-CG
  (linear_operator's ``linear_cg`` on w ↦ Jᵀ H J w + λ w, products chunked over points by
  :class:`~fntk.Linearized`), and a Lanczos low-rank root of the GGN at f* for the covariance:
  Σ ≈ U diag(1/(s + λ)) Uᵀ + (I − U Uᵀ)/λ (the prior in the remaining directions).

Evidence (:meth:`log_evidence`): log Z(λ) ≈ −Ψ(w*) − ½ log det(I + G/λ), G = JᵀH(f*)J; λ is
chosen by maximising it (:func:`optimize_prior_precision`: its exact slope in log λ, secant steps
started from MacKay's update λ ← γ / ‖w* − μ₀‖², γ = tr(G (G + λI)⁻¹)).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from linear_operator.utils.linear_cg import linear_cg
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor
from torch.func import grad, jvp

from fntk._numerics import safe_cholesky
from fntk.curvature import lanczos_root
from fntk.likelihoods import Likelihood
from fntk.linearize import Linearized
from fntk.operators import NTKOperator

F64 = torch.float64


# ---------------------------------------------------------------------------- kernels
_CACHE: dict | None = None


@contextlib.contextmanager
def cached_kernels() -> Iterator[None]:
    """Within this block, kernels computed for the same ``Linearized`` and the same input tensors
    (by identity) are reused, e.g. between a Laplace and a VI classifier sharing one ``Linearized``
    and the same data. The cache (which holds the kernels) is dropped on exit."""
    global _CACHE
    outer = _CACHE
    _CACHE = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            _CACHE = None


_POOLS: list[tuple[Linearized, dict[bytes, int], Tensor]] = []


def _row_keys(x: Tensor) -> list[bytes]:
    rows = x.detach().reshape(x.shape[0], -1).cpu().contiguous().numpy()
    return [r.tobytes() for r in rows]


@contextlib.contextmanager
def kernel_pool(lin: Linearized, x: Tensor) -> Iterator[None]:
    """Compute the kernel K(x, x) of a pool of inputs (N, ...) once with :func:`fntk.ntk`; within
    the block every kernel of ``lin`` whose inputs are all rows of the pool (matched by content)
    is read from it instead of recomputed. For experiments that fit many classifiers on subsets
    of one set of points (nested training sets, a fixed test set): the per-point work of the
    kernel (activations and per-example output gradients) is then done once per point.
    Memory: (N·k)² entries in the model's dtype."""
    x = lin.check_input(x)
    K = _compute_ntk(lin, x, None)
    entry = (lin, {key: i for i, key in enumerate(_row_keys(x))}, K)
    _POOLS.append(entry)
    try:
        yield
    finally:
        _POOLS.remove(entry)


def _from_pool(lin: Linearized, x1: Tensor, x2: Tensor | None) -> Tensor | None:
    k = lin.num_outputs
    for plin, index, K in reversed(_POOLS):
        if plin is not lin:
            continue
        rows = []
        for x in (x1, x1 if x2 is None else x2):
            idx = [index.get(key) for key in _row_keys(x)]
            if any(i is None for i in idx):
                break
            t = torch.as_tensor(idx, device=K.device)
            rows.append((t[:, None] * k + torch.arange(k, device=K.device)).reshape(-1))
        else:
            return K[rows[0]][:, rows[1]].to(F64)
    return None


def _compute_ntk(lin: Linearized, x1: Tensor, x2: Tensor | None) -> Tensor:
    """(n1·k, n2·k) kernel in the model's dtype, by :func:`fntk.ntk` (explicit Jacobians if absent)."""
    try:
        from fntk.ntk import ntk
    except ImportError:  # fntk.ntk not available: explicit Jacobians
        ntk = None
    k = lin.num_outputs
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    if ntk is not None:
        K = ntk(lin, x1, x2, outputs="full")
    else:
        K = NTKOperator(lin, x1, x2, _checked=True).to_dense()
    return K.reshape(n1 * k, n2 * k)


def _ntk(lin: Linearized, x1: Tensor, x2: Tensor | None, cache: bool = True) -> Tensor:
    key = (id(lin), id(x1), None if x2 is None else id(x2))
    cache = cache and _CACHE is not None
    if cache and key in _CACHE:
        return _CACHE[key][2]
    K = _from_pool(lin, x1, x2) if _POOLS else None
    if K is None:
        K = _compute_ntk(lin, x1, x2).to(F64)
    if cache:
        _CACHE[key] = (x1, x2, K)  # the inputs are kept alive so that their ids stay unique
    return K


def kernel_matrix(lin: Linearized, x1: Tensor, x2: Tensor | None = None) -> Tensor:
    """The empirical NTK J(x1) J(x2)ᵀ as a dense (n1·k × n2·k) float64 matrix (point-major rows).

    Uses :func:`fntk.ntk` (structured per-layer Gram, no explicit J). Inputs must be checked by
    ``lin``. Symmetric when x2 is None.
    """
    K = _ntk(lin, x1, x2)
    return 0.5 * (K + K.T) if x2 is None else K


def _diag_blocks(K: Tensor, c: int, k: int) -> Tensor:
    K4 = K.reshape(c, k, c, k)
    idx = torch.arange(c, device=K.device)
    return K4[idx, :, idx, :]


def kernel_diag_blocks(lin: Linearized, x: Tensor, chunk: int = 128) -> Tensor:
    """The per-point (k × k) blocks J(x_i) J(x_i)ᵀ: (n, k, k) float64."""
    k = lin.num_outputs
    return torch.cat(
        [
            _diag_blocks(_ntk(lin, x[s], None, cache=False), s.stop - s.start, k)
            for s in lin._chunks(x.shape[0], chunk)
        ]
    )


def test_kernels(lin: Linearized, x: Tensor, X: Tensor) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Chunks of test points s with K(x_s, X) (c·k × n·k) and the blocks K(x_i, x_i) (c, k, k).

    When it fits the memory budget, one kernel of the concatenation [x_s; X] gives both, so the
    (per-point) work of :func:`fntk.ntk` on X and x_s is done once per chunk rather than twice."""
    n, k, m = X.shape[0], lin.num_outputs, x.shape[0]
    budget = lin.memory_budget
    side = int(math.isqrt(max(budget // 24, 1)) // k)  # (c + n) k squared, in float64 and copies
    c = max(min(side - n, m), 0)
    joint = c >= min(64, m)
    for s in lin._chunks(m, c if joint else 256):
        key = ("test", id(lin), id(x), s.start, s.stop, id(X))
        if _CACHE is not None and key in _CACHE:
            yield s, *_CACHE[key][2]
            continue
        cs = s.stop - s.start
        if joint:
            K = _ntk(lin, torch.cat([x[s], X]), None, cache=False)
            out = K[: cs * k, cs * k :], _diag_blocks(K[: cs * k, : cs * k], cs, k)
        else:
            out = _ntk(lin, x[s], X, cache=False), kernel_diag_blocks(lin, x[s])
        if _CACHE is not None:
            _CACHE[key] = (x, X, out)
        yield s, *out


def prior_mean_function(lin: Linearized, x: Tensor, mu0: Tensor | None) -> Tensor:
    """m₀(x) = f(x; θ̂) + J(x)(μ₀ − θ̂): (n, k) float64 (μ₀ = None means μ₀ = θ̂)."""
    f = lin.forward(x).to(F64)
    if mu0 is None:
        return f
    d = (mu0 - lin.theta.to(F64)).to(lin.dtype)
    return f + lin.jvp_mat(x, d[:, None])[..., 0].to(F64)


# ---------------------------------------------------------------------------- likelihood pieces
class Terms:
    """ℓ(f) = Σ_i nll_i, its gradient g (n, k) and the Hessian root L (n, k, m) at f (n, k)."""

    def __init__(self, lik: Likelihood, f: Tensor, y: Tensor):
        self.f = f
        self.value = float(lik._nll(f, y).sum())
        self.g = grad(lambda ff: lik._nll(ff, y).sum())(f)
        Q, ev = lik._factors(f, y)
        self.L = Q * ev.clamp_min(0).sqrt()[:, None, :]


def nll_sum(lik: Likelihood, f: Tensor, y: Tensor) -> float:
    return float(lik._nll(f, y).sum())


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


@dataclass
class FitInfo:
    """How the MAP solve ended: ``converged`` when ‖∇_w Ψ‖ ≤ tol."""

    converged: bool = False
    n_iter: int = 0
    grad_norm: float = float("inf")
    objective: float = float("nan")
    history: list = field(default_factory=list)


def _lower_solve(R: Tensor, B: Tensor) -> Tensor:
    return torch.linalg.solve_triangular(R, B, upper=False)


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _chol(A: Tensor) -> Tensor:
    """Cholesky with a tiny escalating jitter (warned, with the amount) for matrices that are PD
    only up to rounding; see :func:`fntk._numerics.safe_cholesky`."""
    return safe_cholesky(A, "the Laplace precision matrix", start=1e-12, tries=10)


def _notify(backend: object, step: int, objective: float, grad_norm: float) -> None:
    """Call the user's per-Newton-step callback (``LinearizedClassifier.fit(callback=...)``)."""
    cb = getattr(backend, "callback", None)
    if cb is not None:
        cb({"step": step, "objective": objective, "grad_norm": grad_norm})


# ---------------------------------------------------------------------------- function space
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
            _notify(self, it, obj, gn)
            info.history.append((obj, gn))
            info.n_iter, info.grad_norm, info.objective = it, gn, obj
            if gn <= tol:
                info.converged = True
                break
            if it == max_iter:
                break
            L = terms.L
            h = (f - self.m0).reshape(-1)
            b = self._Lx(L, self._Lt(L, h[:, None]))[:, 0] - terms.g.reshape(-1)
            R = _chol(_eye(L.shape[0] * L.shape[2], L) + self._LtKL(L, lam))
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
        self.R = _chol(_eye(L.shape[0] * L.shape[2], L) + self._LtKL(L, lam))

    # --- evidence
    def weight_sqnorm(self) -> float:
        """‖w* − μ₀‖² = aᵀ K a / λ²."""
        return float(self.a @ (self.K @ self.a)) / self.lam**2

    def log_det_term(self) -> float:
        """½ log det(I + G/λ) = ½ log det(I + Lᵀ K̃ L) (Sylvester)."""
        return float(torch.log(self.R.diagonal()).sum())

    def effective_params(self) -> float:
        """γ = tr(G (G + λI)⁻¹) = n·m − tr(B⁻¹)."""
        Rinv = _lower_solve(self.R, _eye(self.R.shape[0], self.R))
        return float(self.R.shape[0] - Rinv.square().sum())

    def log_evidence(self) -> float:
        return -(self.terms.value + 0.5 * self.lam * self.weight_sqnorm()) - self.log_det_term()

    def evidence_slope(self) -> float:
        """d log Z / d log λ, exactly (see :func:`optimize_prior_precision`); the diagonal blocks of
        S = J P⁻¹ Jᵀ = K̃ − Vᵀ V, V = R⁻¹ Lᵀ K̃, cost one triangular solve with n·k right-hand sides."""
        lam, L, R, n, k = self.lam, self.terms.L, self.R, self.n, self.k
        Kt = self.K / lam
        Kta = Kt @ self.a  # S a = K̃ a − K̃ L B⁻¹ Lᵀ K̃ a;  J dw*/dλ = −S a / λ
        Sa = Kta - Kt @ self._Lx(L, torch.cholesky_solve(self._Lt(L, Kta[:, None]), R))[:, 0]
        dH = _hessian_derivative(self, -Sa.reshape(n, k) / lam)
        V3 = _lower_solve(R, self._Lt(L, Kt)).reshape(R.shape[0], n, k)
        S = _diag_blocks(Kt, n, k) - torch.einsum("jnk,jnl->nkl", V3, V3)
        T = float(torch.einsum("nkl,nlk->", S, dH))
        return 0.5 * (self.effective_params() - lam * self.weight_sqnorm() - lam * T)

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
                V = _lower_solve(self.R, self._Lt(L, Ks.T)).reshape(-1, c, k)  # (nm, c, k)
                covs.append(Kss - torch.einsum("jck,jcl->ckl", V, V))
        return torch.cat(means), (torch.cat(covs) if covariance else None)

    # --- the subspace for VI: top-r eigenvectors of K (J U = Q_r diag(√e_r))
    def subspace(self, r: int) -> tuple[Tensor, Tensor]:
        """(Φ_X = J(X) U (n, k, r'), u* = Uᵀ(w* − μ₀) (r',)), r' ≤ r dropping null directions."""
        e, Q = _top_eig(self.K, r)
        self._sub = (e, Q)
        Phi = (Q * e.sqrt()).reshape(self.n, self.k, -1)
        return Phi, e.sqrt() * (Q.T @ self.a) / self.lam

    def subspace_test(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(m₀(x) (m, k), Φ(x) = J(x) U = K(x, X) Q_r diag(e_r^-½) (m, k, r), K(x_i, x_i) (m, k, k))."""
        e, Q = self._sub
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


# ---------------------------------------------------------------------------- weight space
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
    ):
        self.lin, self.x, self.y, self.lik = lin, x, y, lik
        self.n, self.k, self.p = x.shape[0], lin.num_outputs, lin.num_params
        self.dense, self.rank, self.cg_tol = dense, min(rank, self.p), cg_tol
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
        if self.J is not None:
            return torch.einsum("nkp,nkr->pr", self.J, U)
        return self.lin.vjp_mat(self.x, U.to(self.lin.dtype)).to(F64)

    def _ggn_mv(self, L: Tensor, V: Tensor) -> Tensor:
        """G V = Jᵀ L Lᵀ J V for V (p, r)."""
        JV = self.jv(V)
        return self.jtu(torch.einsum("nkm,nlm,nlr->nkr", L, L, JV))

    def _precision_chol(self, L: Tensor, lam: float) -> Tensor:
        B = torch.einsum("nkm,nkp->nmp", L, self.J).reshape(-1, self.p)
        P = B.T @ B
        P.diagonal().add_(lam)
        return _chol(P)

    def fit(self, lam: float, tol: float, max_iter: int) -> FitInfo:
        """Damped Newton (dense Cholesky or CG) to ‖∇_w Ψ‖ ≤ tol, warm-started at the last w."""
        self.lam = lam
        info = FitInfo()
        for it in range(max_iter + 1):
            f = self.f0 + self.jv((self.w - self.theta)[:, None])[..., 0]
            terms = Terms(self.lik, f, self.y)
            dw0 = self.w - self.mu0
            g = self.jtu(terms.g[..., None])[:, 0] + lam * dw0
            gn = float(g.norm())
            obj = terms.value + 0.5 * lam * float(dw0 @ dw0)
            _notify(self, it, obj, gn)
            info.history.append((obj, gn))
            info.n_iter, info.grad_norm, info.objective = it, gn, obj
            if gn <= tol:
                info.converged = True
                break
            if it == max_iter:
                break
            if self.dense:
                d = -torch.cholesky_solve(g[:, None], self._precision_chol(terms.L, lam))[:, 0]
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

    def _posterior(self) -> None:
        lam = self.lam
        self.f_star = self.f0 + self.jv((self.w - self.theta)[:, None])[..., 0]
        self.terms = Terms(self.lik, self.f_star, self.y)
        if self.dense:
            self.R = self._precision_chol(self.terms.L, lam)
        else:
            self.s, self.U = lanczos_root(_GGNOperator(self, self.terms.L), self.rank)
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
            Rinv = _lower_solve(self.R, _eye(self.p, self.R))
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

    def evidence_slope(self) -> float:
        """d log Z / d log λ: exact when dense, with the low-rank covariance otherwise."""
        lam = self.lam
        dH = _hessian_derivative(self, -self.jv(self._cov_mv(self.w - self.mu0)[:, None])[..., 0])
        if self.dense:
            V = _lower_solve(self.R, self.J.reshape(-1, self.p).T).reshape(self.p, self.n, self.k)
            T = float(torch.einsum("pnk,nkl,pnl->", V, dH, V))  # Σ_i tr(J_i P⁻¹ J_iᵀ dH_i)
        else:
            JU = self.jv(self.U)
            D = 1.0 / (self.s + lam) - 1.0 / lam
            S = kernel_diag_blocks(self.lin, self.x) / lam + torch.einsum("nkr,r,nlr->nkl", JU, D, JU)
            T = float(torch.einsum("nkl,nlk->", S, dH))
        return 0.5 * (self.effective_params() - lam * self.weight_sqnorm() - lam * T)

    def predict(self, x: Tensor, covariance: bool = True, chunk: int = 256) -> tuple[Tensor, Tensor | None]:
        """Mean (c, k) and covariance J* Σ J*ᵀ (c, k, k) of the linearized logits at checked x."""
        lin, k = self.lin, self.k
        means, covs = [], []
        dw = (self.w - self.theta)[:, None]
        for s in lin._chunks(x.shape[0], chunk):
            xs = x[s]
            c = xs.shape[0]
            if self.dense:
                Js = lin.jacobian_mat(xs).to(F64)  # (c, k, p)
                means.append(lin.forward(xs).to(F64) + torch.einsum("ckp,p->ck", Js, dw[:, 0]))
                if covariance:
                    V = _lower_solve(self.R, Js.reshape(c * k, self.p).T).reshape(self.p, c, k)
                    covs.append(torch.einsum("pck,pcl->ckl", V, V))
            else:
                means.append(lin.forward(xs).to(F64) + self.jv(dw, xs)[..., 0])
                if covariance:
                    JU = self.jv(self.U, xs)  # (c, k, r)
                    D = 1.0 / (self.s + self.lam) - 1.0 / self.lam
                    covs.append(
                        kernel_diag_blocks(lin, xs) / self.lam + torch.einsum("ckr,r,clr->ckl", JU, D, JU)
                    )
        return torch.cat(means), (torch.cat(covs) if covariance else None)

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
            jtj = _GGNOperator(self, None)
            e, U = lanczos_root(jtj, min(r, self.p))
            U = U[:, e > 1e-14 * e[0]]
        self._U = U
        return self.jv(U), U.T @ (self.w - self.mu0)

    def subspace_test(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(m₀(x) (c, k), Φ(x) = J(x) U (c, k, r), K(x_i, x_i) (c, k, k))."""
        m0 = prior_mean_function(self.lin, x, self.mu0_arg)
        if self.dense:
            Js = self.lin.jacobian_mat(x).to(F64)
            return m0, Js @ self._U, Js @ Js.mT
        return m0, self.jv(self._U, x), kernel_diag_blocks(self.lin, x)

    def subspace_weights(self, u: Tensor) -> Tensor:
        return self.mu0 + self._U @ u


class _GGNOperator:
    """Jᵀ L Lᵀ J (or Jᵀ J when L is None) at the training points, as the (p × p) matrix-free
    operator :func:`~fntk.curvature.lanczos_root` needs (shape, dtype, device, ``@``). H is taken
    at the *linearized* logits f_lin(x; w), which :class:`~fntk.GGNOperator` (H at f(x; θ̂)) does
    not offer; so it is composed here from the Jacobian products and the likelihood's factors."""

    def __init__(self, ws: WeightSpace, L: Tensor | None):
        self.ws, self.L = ws, L
        self.shape, self.dtype, self.device = (ws.p, ws.p), F64, ws.theta.device

    def __matmul__(self, V: Tensor) -> Tensor:
        if self.L is None:
            return self.ws.jtu(self.ws.jv(V))
        return self.ws._ggn_mv(self.L, V)


def _top_eig(K: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r eigenpairs (descending) of a symmetric PSD K, dropping numerically null ones: dense
    ``eigh`` for N ≤ 3000, else Lanczos (:func:`~fntk.curvature.lanczos_root`)."""
    N = K.shape[0]
    r = min(r, N)
    if N <= 3000 or r > N // 4:
        e, Q = torch.linalg.eigh(K)
        e, Q = e.flip(0)[:r], Q.flip(1)[:, :r]
    else:
        e, Q = lanczos_root(K, r, num_iter=min(N, 2 * r + 50))
    keep = e > 1e-10 * e[0].clamp_min(1e-300)
    return e[keep], Q[:, keep]


# ---------------------------------------------------------------------------- prior precision
def _hessian_derivative(b: FunctionSpace | WeightSpace, df: Tensor) -> Tensor:
    """DH_i[df_i]: the directional derivative (n, k, k) of the likelihood Hessians at f* along df
    = J dw*/dλ (torch.func.jvp of the likelihood's Hessian)."""
    lik, y = b.lik, b.y
    return jvp(lambda f: lik._hessian(f, y), (b.f_star,), (df,))[1]


@dataclass
class MarglikInfo:
    """The λ iterations: (λ, log evidence, d log Z / d log λ) per step, and whether λ settled."""

    history: list = field(default_factory=list)
    converged: bool = False


def optimize_prior_precision(
    backend: FunctionSpace | WeightSpace,
    tol: float,
    max_iter: int,
    lam0: float = 1.0,
    rtol: float = 1e-3,
    slope_tol: float = 1e-6,
    max_steps: int = 40,
    max_step: float = 4.0,
    bounds: tuple[float, float] = (1e-8, 1e8),
) -> tuple[float, FitInfo, MarglikInfo]:
    r"""λ maximising the Laplace evidence log Z(λ) = −Ψ(w*) − ½ log det(P/λ), P = G(f*) + λI.

    Its exact slope in ρ = log λ is (implicit differentiation, dw*/dλ = −P⁻¹(w* − μ₀))

        D(ρ) = ½[γ − λ‖w* − μ₀‖² − λ Σ_i tr(S_i DH_i[J_i dw*/dλ])],  γ = tr(G P⁻¹),  S = J P⁻¹ Jᵀ;

    dropping the last term (the change of H with w*) gives MacKay's fixed point λ = γ/‖w* − μ₀‖²,
    which is only near the maximum. We solve D = 0 in ρ: MacKay-type steps (always uphill) or
    secant steps on D when they also go uphill (doubling the step while D shrinks slowly), then,
    once D has changed sign, secant steps kept inside the bracket (bisection otherwise);
    |Δρ| ≤ ``max_step``, each step refitting the MAP warm-started, until |D| ≤ ``slope_tol`` or
    |Δρ| < ``rtol`` (λ may end at a bound when the evidence is monotone, e.g. λ → ∞ when the source
    network already explains the data). Returns (λ, the MAP fit at λ, the history)."""
    lo_b, hi_b = math.log(bounds[0]), math.log(bounds[1])
    rho, ml = math.log(lam0), MarglikInfo()
    info = backend.fit(math.exp(rho), tol, max_iter)
    pts: list[tuple[float, float]] = []
    prev_step = 0.0
    for _ in range(max_steps):
        lam = math.exp(rho)
        D, sq = backend.evidence_slope(), backend.weight_sqnorm()
        ml.history.append((lam, backend.log_evidence(), D))
        pts.append((rho, D))
        if abs(D) <= slope_tol:  # log Z changes by < slope_tol per e-fold of λ
            ml.converged = True
            break
        # MacKay-type step: the zero of D if γ − λT and ‖w* − μ₀‖² stayed fixed; it always moves
        # uphill (the sign of D), so it is the fallback whenever the secant points the wrong way
        num = 2 * D + lam * sq
        step = math.log(num / (lam * sq)) if num > 0 and sq > 0 else math.copysign(3.0, D)
        pos = [r for r, v in pts if v > 0]  # evidence increasing there: the maximum lies above
        neg = [r for r, v in pts if v < 0]
        bracketed = bool(pos and neg and max(pos) < min(neg))
        if len(pts) >= 2:
            (r0, d0), (r1, d1) = pts[-2], pts[-1]
            sec = r1 - d1 * (r1 - r0) / (d1 - d0) if d1 != d0 else math.nan
            if math.isfinite(sec) and (sec - rho) * D > 0:
                step = sec - rho
            if not bracketed and d0 * d1 > 0 and abs(d1) > 0.25 * abs(d0):  # slow progress: expand
                step = math.copysign(max(abs(step), 2 * abs(prev_step)), D)
        new = rho + step
        if bracketed:
            a, b = max(pos), min(neg)
            if b - a < rtol:
                ml.converged = True
                break
            if not (a < new < b):
                new = 0.5 * (a + b)
        new = min(max(new, rho - max_step, lo_b), rho + max_step, hi_b)
        if abs(new - rho) < rtol:  # settled, or pushed against a bound (λ → 0 or ∞)
            ml.converged = True
            break
        prev_step, rho = new - rho, new
        info = backend.fit(math.exp(rho), tol, max_iter)
    return math.exp(rho), info, ml


__all__ = [
    "FunctionSpace",
    "WeightSpace",
    "FitInfo",
    "MarglikInfo",
    "kernel_matrix",
    "kernel_pool",
    "cached_kernels",
    "kernel_diag_blocks",
    "prior_mean_function",
    "optimize_prior_precision",
]
