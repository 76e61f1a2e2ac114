r"""The matrix-free exact GP (see :mod:`fntk.gp.dense` for the model and notation).

Function space multiplies by G = J Jᵀ (NTKOperator products), weight space by A = JᵀJ (Jᵀ(J v)
products); a product costs one batched jvp and one batched vjp over the n points in either space,
so vectors live in the smaller one. A batch of Lanczos runs (full reorthogonalisation,
:func:`fntk.linalg.lanczos_batch`) on the hyperparameter-free G or A gives

- Gauss quadrature for the quadratic forms zᵀM⁻¹z, zᵀM⁻¹1, 1ᵀM⁻¹1 and stochastic Lanczos
  quadrature for log|M| at *any* (s, σ²), because Krylov spaces are shift- and scale-invariant:
  K_R(sG + σ²I, v) = K_R(G, v) (the "fixed-Krylov" marginal likelihood used for learning);
- Ritz pairs (θ_i, u_i): a deflation preconditioner P = U diag(θ + λ)Uᵀ + (θ_min + λ)(I − UUᵀ)
  for linear_operator's CG (the mean), and the Lanczos root of the predictive covariance,
  Var f(x*) ≈ s‖J*‖² − s Σ_i (J* v_i)² θ_i/(θ_i + λ) (prior minus explained variance; exact once
  the Ritz space holds the spectrum above λ; v_i the weight-space Ritz vectors).

Hand-written because linear_operator lacks them: the fixed-Krylov objective (GPyTorch reruns CG
+ SLQ at every optimiser step), the Ritz preconditioner (its pivoted Cholesky needs kernel rows,
each a full pass over the data here). Lanczos is fntk's (:func:`fntk.linalg.lanczos_batch`); CG is
linear_operator's ``linear_cg``, checked by :func:`fntk.linalg.check_cg`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.utils.linear_cg import linear_cg
from torch import Tensor

from fntk import persist, validation
from fntk.errors import NumericalWarning
from fntk.gp.dense import profile_b
from fntk.gp.hyper import F64, LOG2PI, Hyper, Objective
from fntk.linalg import check_cg, lanczos_batch
from fntk.linearize import Linearized
from fntk.ntk import cache
from fntk.operators import gram


@persist.register("gp.IterativeOptions")
@dataclass
class IterativeOptions:
    """Settings of the matrix-free solver.

    cg_tolerance: relative residual at which CG stops (linear_operator's criterion);
    max_cg_iterations: CG iteration cap; lanczos_iterations: R, the Krylov dimension of the
    Lanczos runs (quadrature, Ritz root, preconditioner); num_probes: random probes of the
    stochastic Lanczos quadrature for log-determinants; seed: their random seed.
    """

    cg_tolerance: float | None = None
    max_cg_iterations: int = 1000
    lanczos_iterations: int = 100
    num_probes: int = 8
    seed: int = 0


#: fewer Lanczos steps than this give Gauss quadratures of the marginal likelihood far from the
#: exact value on ordinary problems (measured: n = 200, R = 3…30, the learned mean 1-30 sd off)
MIN_LANCZOS = 10
#: the fixed-Krylov marginal likelihood at the learned hyperparameters may differ from the one
#: with the CG solution by this many nats (plus 1e-3 relative) before fit warns
QUADRATURE_GAP = 0.1


def check_options(options: Any) -> dict:
    """The checked ``solver_options`` dict (see :class:`IterativeOptions`), a copy."""
    v = validation

    def tolerance(name: str, value: Any) -> float | None:
        return v.real(name, value, positive=True, below=1.0, allow_none=True)

    return v.check_options("solver_options", options, {
        "cg_tolerance": tolerance,
        "max_cg_iterations": v.positive_int,
        "lanczos_iterations": lambda name, value: v.positive_int(name, value, MIN_LANCZOS),
        "num_probes": v.positive_int,
        "seed": v.seed,
    })


@persist.register("gp.Krylov")
@dataclass
class Krylov:
    """One Lanczos run from v on a symmetric PSD A (N × N): vᵀf(A)v ≈ Σ weights·f(nodes) (Gauss
    quadrature; exact when ``exhausted``, i.e. the Krylov space became invariant)."""

    nodes: Tensor  # Ritz values θ (R',)
    weights: Tensor  # ‖v‖²·S₁² (R',)
    exhausted: bool
    vectors: Tensor | None = None  # Ritz vectors (N, R') (only for the root run)


def _lanczos(
    matmul: Callable[[Tensor], Tensor], V: Tensor, R: int, keep_vectors: int, budget: int
) -> list[Krylov]:
    """:func:`lanczos_batch` from each column of V (N, t), at most R steps, in batches of columns
    whose Krylov bases fit ``budget`` bytes; Gauss quadrature nodes and weights per column, Ritz
    vectors for column ``keep_vectors`` only. Zero columns get zero weights."""
    N, t = V.shape
    R = max(1, min(R, N))
    batch = max(1, min(t, budget // max((R + 2) * N * 8, 1)))
    out: list[Krylov] = []
    for start in range(0, t, batch):
        cols = V[:, start : start + batch].to(F64)
        norms = cols.norm(dim=0)
        init = torch.where(norms > 0, cols, torch.ones_like(cols))
        alpha, beta, Q, steps = lanczos_batch(matmul, init, R)
        for j in range(cols.shape[1]):
            r = int(steps[j])
            T = torch.diag(alpha[j, :r]) + torch.diag(beta[j, : r - 1], 1) + torch.diag(beta[j, : r - 1], -1)
            theta, S = torch.linalg.eigh(T)
            k = Krylov(theta.clamp_min(0), norms[j] ** 2 * S[0] ** 2, r < R or r == N)
            if start + j == keep_vectors:
                k.vectors = Q[j, :r].mT @ S
            out.append(k)
    return out


def _polarize(a: Tensor, c: Tensor, m: Tensor, nu: Tensor, nv: Tensor) -> Tensor:
    """uᵀM⁻¹v from a = uᵀM⁻¹u, c = vᵀM⁻¹v and m = wᵀM⁻¹w, w = u/‖u‖ + v/‖v‖ (0 if u or v is 0)."""
    if float(nu) == 0.0 or float(nv) == 0.0:
        return torch.zeros_like(a)
    return 0.5 * nu * nv * (m - a / nu**2 - c / nv**2)


def _quad(k: Krylov, f: Callable[[Tensor], Tensor]) -> Tensor:
    return (k.weights * f(k.nodes)).sum()


@persist.register("gp.Iterative")
class Iterative:
    """Matrix-free exact GP in function space (G products) or weight space (A products), per output."""

    def __init__(
        self,
        lin: Linearized,
        x: Tensor,
        outputs: Sequence[int],
        z: Tensor,
        space: str,
        opts: IterativeOptions,
    ):
        self.lin, self.x, self.outputs, self.z, self.space, self.opts = lin, x, list(outputs), z, space, opts
        self.n, self.p = x.shape[0], lin.num_params
        tol = opts.cg_tolerance
        self.tol = tol if tol is not None else (1e-6 if lin.dtype == F64 else 1e-4)
        self.N = self.n if space == "function" else self.p
        self.gen = torch.Generator().manual_seed(opts.seed)
        self.ops = self._operators()
        if space == "weight":  # Jᵀz and Jᵀ1 for every output
            G = [
                gram.jacobian_t(lin, x, c, torch.stack([z[j], torch.ones_like(z[j])], -1)).to(F64)
                for j, c in enumerate(self.outputs)
            ]
            self.gz = torch.stack([g[:, 0] for g in G])
            self.g1 = torch.stack([g[:, 1] for g in G])
        self.zz, self.z1 = (z * z).sum(-1), z.sum(-1)
        self._quads: list[list[tuple[Tensor, Tensor]]] | None = None
        self._ritz: list[tuple[Tensor, Tensor]] | None = None
        self._slq: list[list[tuple[Tensor, Tensor]]] | None = None
        self.h: Hyper | None = None
        self.cg_iterations: list[int] = []

    def __fntk_state__(self) -> dict:
        """What a saved adapter stores: everything but the operators and the generator."""
        return {k: v for k, v in vars(self).items() if k not in ("ops", "gen")}

    def __fntk_restore__(self) -> None:
        """Rebuild the operators and the probe generator after loading."""
        self.ops = self._operators()
        self.gen = torch.Generator().manual_seed(self.opts.seed)

    def _operators(self) -> list:
        lin, x = self.lin, self.x
        mk = gram.ntk_operator if self.space == "function" else gram.weight_gram_operator
        return [mk(lin, x, c) for c in self.outputs]

    # products in the model's dtype, vectors in float64
    def _mm(self, j: int) -> Callable[[Tensor], Tensor]:
        op = self.ops[j]
        return lambda V: (op @ V.to(self.lin.dtype)).to(F64)

    def _rademacher(self, t: int) -> Tensor:
        return (torch.randint(0, 2, (self.N, t), generator=self.gen) * 2 - 1).to(F64).to(self.lin.device)

    def point_bytes(self) -> int:
        """Working bytes of :meth:`predict` per test point (the products J*[w̄, Z] and their rows)."""
        return 3 * 8 * len(self.outputs) * (self.opts.lanczos_iterations + 2)

    def prior_scale(self) -> Tensor:
        """tr(G)/n = mean k(x_i, x_i) per output (k',), exactly (structured kernel diagonals)."""
        return cache.kernel_diagonal(self.lin, self.x, self.outputs).to(F64).mean(-1)

    def _run_lanczos(self, with_probes: bool) -> None:
        """One batch of Lanczos runs per output: the Ritz root (random start), and with
        ``with_probes`` the quadratic-form probes (z, 1 and their mix) and the SLQ probes."""
        T, R = self.opts.num_probes, self.opts.lanczos_iterations
        quads, slq, ritz = [], [], []
        for j in range(len(self.outputs)):
            if self.space == "function":
                u, v = self.z[j], torch.ones_like(self.z[j])
            else:
                u, v = self.gz[j], self.g1[j]
            cols = [self._rademacher(1)]  # column 0: the Ritz root's random start
            if with_probes:
                mix = u / u.norm().clamp_min(1e-300) + v / v.norm().clamp_min(1e-300)
                cols += [torch.stack([u, v, mix], -1), self._rademacher(T)]
            runs = _lanczos(self._mm(j), torch.cat(cols, -1), R, 0, self.lin.memory_budget)
            ritz.append(runs[0])
            if with_probes:
                quads.append(runs[1:4])
                slq.append([runs[0]] + runs[4:])
        self._ritz = ritz
        if with_probes:
            self._quads, self._slq = quads, slq

    def _logdet_fn(self, j: int) -> Callable[[Tensor, Tensor], Tensor]:
        """log|sG + σ²I| for any (log s, log σ²) scalars: exact from the Ritz values when the root's
        Krylov space is invariant (the rest of the spectrum is 0), else stochastic Lanczos
        quadrature over the random probes (Rademacher: E[zᵀf(A)z] = tr f(A))."""
        n, N, root = self.n, self.N, self._ritz[j]
        if root.exhausted:
            theta, zeros = root.nodes, N - root.nodes.numel()

            def f(log_s: Tensor, log_noise: Tensor) -> Tensor:
                s, noise = log_s.exp(), log_noise.exp()
                if self.space == "function":
                    return torch.log(s * theta + noise).sum() + zeros * log_noise
                return n * log_noise + torch.log1p(theta * s / noise).sum()

            return f
        if self._slq is None:
            self._run_lanczos(with_probes=True)
        probes = self._slq[j]

        def g(log_s: Tensor, log_noise: Tensor) -> Tensor:
            s, noise = log_s.exp(), log_noise.exp()
            if self.space == "function":
                return torch.stack([_quad(q, lambda th: torch.log(s * th + noise)) for q in probes]).mean()
            est = torch.stack([_quad(q, lambda th: torch.log1p(th * s / noise)) for q in probes])
            return n * log_noise + est.mean()

        return g

    def objective(self) -> Objective:
        """Fixed-Krylov marginal likelihood: Gauss quadrature for the quadratic forms in z and 1,
        stochastic Lanczos quadrature for the log-determinant, at any (s, σ², b)."""
        if self._quads is None:
            self._run_lanczos(with_probes=True)
        n, zz, z1 = self.n, self.zz, self.z1
        k = len(self.outputs)
        if self.space == "function":
            nu, nv = zz.sqrt(), torch.full_like(zz, math.sqrt(n))
        else:
            nu, nv = self.gz.norm(dim=-1), self.g1.norm(dim=-1)
        logdets = [self._logdet_fn(j) for j in range(k)]

        def f(log_s: Tensor, log_noise: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
            qzz, qz1, q11, ld = [], [], [], []
            for j in range(k):
                s, noise = log_s[j].exp(), log_noise[j].exp()
                if self.space == "function":
                    inv = lambda th, s=s, noise=noise: 1.0 / (s * th + noise)  # noqa: E731
                else:
                    inv = lambda th, s=s, noise=noise: 1.0 / (th + noise / s)  # noqa: E731
                a, c, m = (_quad(q, inv) for q in self._quads[j])
                cross = _polarize(a, c, m, nu[j], nv[j])
                if self.space == "function":
                    qzz.append(a), qz1.append(cross), q11.append(c)
                else:  # Woodbury: uᵀM⁻¹v = (uᵀv − (Jᵀu)ᵀ(A + λI)⁻¹Jᵀv)/σ²
                    qzz.append((zz[j] - a) / noise), qz1.append((z1[j] - cross) / noise)
                    q11.append((n - c) / noise)
                ld.append(logdets[j](log_s[j], log_noise[j]))
            quad, b = profile_b(torch.stack(qzz), torch.stack(qz1), torch.stack(q11), b)
            return -0.5 * (quad + torch.stack(ld) + n * LOG2PI), b

        return f

    def condition(self, h: Hyper) -> None:
        """CG (deflation-preconditioned by the Ritz pairs) for the mean; the Lanczos root for the
        covariance. Stores w̄ (k', p) and the root Z (k', p, R) of the explained covariance."""
        self.h = h
        if self._ritz is None:
            self._run_lanczos(with_probes=False)
        self.wbar, self.Z, self.quad, self.cg_iterations = [], [], [], []
        for j, c in enumerate(self.outputs):
            s, noise, b = h.scale[j], h.noise[j], h.constant[j]
            theta, Uv = self._ritz[j].nodes, self._ritz[j].vectors
            if self.space == "function":  # M = sG + σ²I, rhs z − b
                rhs = self.z[j] - b
                mvals, shift, fac = s * theta, noise, s
            else:  # M = A + λI, rhs Jᵀ(z − b)
                rhs = self.gz[j] - b * self.g1[j]
                mvals, shift, fac = theta, noise / s, 1.0
            floor = float(mvals.min()) if mvals.numel() else 0.0

            def precond(Rv, U=Uv, d=mvals + shift, dc=floor + shift):
                P = U.mT @ Rv
                return U @ (P / d[:, None]) + (Rv - U @ P) / dc

            mm = self._mm(j)
            count = [0]

            def closure(V, mm=mm, fac=fac, shift=shift, count=count):
                count[0] += 1
                return fac * mm(V) + shift * V

            sol = linear_cg(
                closure,
                rhs[:, None],
                tolerance=self.tol,
                max_iter=self.opts.max_cg_iterations,
                preconditioner=precond,
                # linear_cg treats pᵀMp < eps as a breakdown; its default 1e-10 (in units of the
                # normalised rhs) stalls a well-preconditioned CG near 1e-5 relative residual
                eps=torch.finfo(F64).tiny,
                stop_updating_after=0.1 * self.tol,
                max_tridiag_iter=0,  # no Lanczos from CG (its default 20 exceeds small CG caps)
            )[:, 0]
            self.cg_iterations.append(count[0])  # before the check (its products are not CG steps)
            sol = check_cg(closure, rhs, sol, self.tol, self.lin.memory_budget, f"CG ({self.space} space)")
            if self.space == "function":
                # w̄ = s Jᵀα and the root JᵀU diag(√(s/(θ+λ))) in one batched vjp
                cols = torch.cat([sol[:, None], Uv], -1)
                JtC = gram.jacobian_t(self.lin, self.x, c, cols).to(F64)
                self.wbar.append(s * JtC[:, 0])
                self.Z.append(JtC[:, 1:] * (s / (theta + noise / s)).sqrt())
                self.quad.append((rhs * sol).sum())
            else:
                self.wbar.append(sol)
                self.Z.append(Uv * (s * theta / (theta + noise / s)).sqrt())
                rr = self.zz[j] - 2 * b * self.z1[j] + b * b * self.n
                self.quad.append((rr - (rhs * sol).sum()) / noise)

    def check_quadrature(self, objective: Objective) -> None:
        """Warn (:class:`~fntk.NumericalWarning`) when the fixed-Krylov marginal likelihood the
        hyperparameters were learned with differs at them from the one with the CG solution's
        quadratic term by more than QUADRATURE_GAP nats (+1e-3 relative): ``lanczos_iterations``
        was too few for the spectrum, and the learned values may be far from the exact GP's."""
        h = self.h
        with torch.no_grad():
            quad, _ = objective(h.scale.log(), h.noise.log(), h.constant)
            exact = self.lml()
        gap = (quad - exact).abs()
        bad = gap > QUADRATURE_GAP + 1e-3 * exact.abs()
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            warnings.warn(
                f"the marginal likelihood the hyperparameters were learned with (Gauss quadrature "
                f"with lanczos_iterations={self.opts.lanczos_iterations}) is {float(quad[j]):.6g}, but "
                f"{float(exact[j]):.6g} with the exact CG solve at them: the Krylov space is too small "
                "for this kernel's spectrum; increase solver_options['lanczos_iterations'] (or use "
                "solver='direct')",
                NumericalWarning,
                stacklevel=3,
            )

    def lml(self) -> Tensor:
        """Quadratic term from the CG solution; log-determinant exact when the root's Krylov space
        is invariant, else by stochastic Lanczos quadrature (probes run on demand)."""
        h = self.h
        out = []
        for j in range(len(self.outputs)):
            ld = self._logdet_fn(j)(h.scale[j].log(), h.noise[j].log())
            out.append(-0.5 * (self.quad[j] + ld + self.n * LOG2PI))
        return torch.stack(out)

    def predict(self, xs: Tensor, full_cov: bool) -> tuple[Tensor, Tensor]:
        means, covs = [], []
        for j, c in enumerate(self.outputs):
            W = torch.cat([self.wbar[j][:, None], self.Z[j]], -1)
            F = gram.jacobian_v(self.lin, xs, c, W).to(F64)  # (m, 1 + R)
            means.append(F[:, 0])
            JZ, s = F[:, 1:], self.h.scale[j]
            if full_cov:
                Kss = cache.output_kernels(self.lin, xs, None, [c]).to(F64)[0]
                covs.append(s * Kss - JZ @ JZ.T)
            else:
                kss = cache.kernel_diagonal(self.lin, xs, [c]).to(F64)[0]
                covs.append((s * kss - JZ.square().sum(-1)).clamp_min(0))
        return torch.stack(means), torch.stack(covs)
