"""Choosing function space or weight space, direct or iterative, from n, p and a cost model.

Estimated seconds, with fntk's cost model (:mod:`fntk.ntk.costs`: R_GEMM for matrix products and
LAPACK, R_AD for forward/backward passes) and fntk.ntk's kernel-time estimates; F = forward
multiply-adds per point, n points, p parameters, k' outputs, m = 50 test points:

- function, direct: the n × n kernel (and the m × n cross kernel) by ``fntk.ntk`` (structured
  per-layer Grams for Linear/Conv/...: never p per entry), Cholesky n³/3 (eigh ≈ 25× that when
  hyperparameters are learned), triangular solves n²m; memory ≈ 3 n² doubles per output.
- weight, direct: per-example Jacobian rows (one forward and k' backward passes per point),
  JᵀJ accumulated (2np² flops), Cholesky p³/3 (eigh ≈ 25×), J* solves p²m; memory ≈ 3 p² doubles.
- iterative (vectors in the smaller space, min(n, p); the products cost the same in both):
  each J(Jᵀ·) or Jᵀ(J·) column costs ≈ 10·F flops per point (a forward-mode jvp ≈ 4F per tangent,
  a vjp ≈ F + 2F per cotangent) over R Lanczos steps (× (4 + probes) columns when learning),
  ≥ 11 CG steps (linear_operator's minimum) and, in function space, the R-column root Jᵀ U;
  plus a fixed overhead per batched call (Python, vmap) that dominates for small networks.

The cost guards live here too: a plan whose chosen strategy is estimated above the regressor's
``time_limit`` is refused (:class:`~fntk.TimeLimitError`) before any pass over the data, an
explicit ``solver="direct"`` whose dense matrices exceed ``memory_limit`` is refused
(:class:`~fntk.NTKMemoryError`), predictions run in chunks of test points that fit the memory
budget, and a full predictive covariance is checked before it is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fntk.errors import NTKMemoryError, TimeLimitError
from fntk.linearize import Linearized
from fntk.linearize.taps import analyze
from fntk.ntk import cache
from fntk.ntk.costs import ELEM, R_AD, R_GEMM, cheapest
from fntk.settings import available_memory
from fntk.validation import over_memory, over_time

SPACES = ("auto", "function", "weight")
SOLVERS = ("auto", "direct", "iterative")
EIGH_FACTOR = 25.0  # eigh with eigenvectors / Cholesky, measured (MKL, float64, n = 500…2000)
CG_STEPS = 30  # typical deflation-preconditioned CG steps (linear_operator runs at least 11)
CALL = 2e-3  # seconds of Python/vmap overhead per batched product call, per parameterised layer
F64_BYTES = 8


def memory_limit_bytes(memory_limit: int | None) -> int:
    """The regressor's limit for dense matrices: ``memory_limit``, default half the available RAM."""
    return memory_limit if memory_limit is not None else available_memory() // 2


@dataclass
class Plan:
    space: str
    solver: str
    seconds: dict[str, float]  # estimated fit + predict(50 points) time of each strategy


def estimate(
    lin: Linearized, x: Tensor, kk: int, learn: bool, R: int, probes: int, m: int = 50
) -> dict[str, float]:
    """Estimated seconds of the three strategies (see the module docstring) on checked inputs x."""
    n, p = x.shape[0], lin.num_params
    F = analyze(lin, x).flops
    fact = EIGH_FACTOR if learn else 1.0
    xs = x[: min(m, n)]
    function = (
        cache.output_kernel_seconds(lin, x, None, kk)
        + cache.output_kernel_seconds(lin, x, xs, kk)
        + kk * (fact * n**3 / 3 + n * n * m) / R_GEMM
    )
    jac_rows = (n + m) * 2 * F * (1 + 2 * kk) / R_AD + (n + m) * 2 * ELEM * kk * p / R_GEMM
    weight = jac_rows + kk * (2.0 * n * p * p + fact * p**3 / 3 + 2.0 * m * p * p) / R_GEMM
    column = 10.0 * F * n / R_AD
    calls = R + CG_STEPS + 1
    columns = R * (1 + (3 + probes if learn else 0)) + CG_STEPS + (R + 1 if n <= p else 0)
    layers = max(1, len(analyze(lin, x).layers))
    iterative = kk * (columns * column + calls * CALL * layers) + jac_rows
    return {"function": function, "weight": weight, "iterative": iterative}


def plan(
    lin: Linearized,
    x: Tensor,
    kk: int,
    space: str,
    solver: str,
    learn: bool,
    R: int,
    probes: int,
    memory_limit: int | None,
    time_limit: float | None = None,
) -> Plan:
    """Pick (space, solver) among those allowed by ``space``/``solver`` and the memory limit;
    refuse (before any pass over the data, :class:`~fntk.NTKMemoryError`) when no allowed one fits
    the limit, and (:class:`~fntk.TimeLimitError`) when the cheapest is estimated above
    ``time_limit`` seconds."""
    n, p = x.shape[0], lin.num_params
    limit = memory_limit_bytes(memory_limit)
    t = estimate(lin, x, kk, learn, R, probes)
    need = {"function": 3 * kk * n * n * F64_BYTES, "weight": 3 * kk * p * p * F64_BYTES}
    shape = f"n={n:,} points, p={p:,} parameters, {kk} output(s)"
    smaller = "function" if n <= p else "weight"
    options: dict[tuple[str, str], float] = {}
    for sp in ("function", "weight"):
        if space not in ("auto", sp):
            continue
        if solver in ("auto", "direct") and need[sp] <= limit:
            options[(sp, "direct")] = t[sp]
        if solver in ("auto", "iterative") and (space == sp or sp == smaller):
            root = 2 * kk * (R + 1) * p * F64_BYTES  # Ritz roots and the w̄/Z of the posterior
            if root <= limit:
                options[(sp, "iterative")] = t["iterative"] * (1.0 if sp == smaller else 1.05)
    if not options:
        if solver == "iterative":
            what, nbytes = "the matrix-free solver's Lanczos roots", 2 * kk * (R + 1) * p * F64_BYTES
        else:
            sp = min((s for s in ("function", "weight") if space in ("auto", s)), key=lambda s: need[s])
            what, nbytes = f"the dense {sp}-space solve", need[sp]
        hint = "pass a larger memory_limit (bytes), select fewer parameters (params=...) or fit fewer points"
        if solver == "direct":
            hint += ", or use solver='iterative' (matrix-free)"
        elif solver == "iterative":
            hint += ", or lower solver_options['lanczos_iterations']"
        raise NTKMemoryError(
            f"the GP fit ({shape}, {lin.dtype}) fits no solver: "
            + over_memory(what, max(nbytes, limit + 1), limit, "memory_limit", hint)
        )
    sp, so = cheapest(options, "the GP fit")
    msg = over_time(
        f"NTKRegressor.fit ({sp} space, {so} solver; {shape})", options[(sp, so)], time_limit,
        "fit a subset of the points or of the parameters (params=...)",
    )
    if msg is not None:
        raise TimeLimitError(msg)
    return Plan(sp, so, t)


#: evaluations of a composite model's evidence per fit (4 starts, L-BFGS ≤ 100 iterations) and the
#: cost of one with its gradient, in units of n³/3 flops (Cholesky, triangular solves, backward)
COMPOSITE_EVALS, COMPOSITE_EVAL_COST = 130, 4.0


def choice_seconds(models, n: int) -> float:
    """Estimated seconds of the models' hyperparameter searches beyond one plain fit: every
    composite model's Cholesky-per-evaluation search and its scores (leave-one-out inverse, Hessian
    by 2q gradients ≈ 20 evaluations), every further spectral one's O(n²) pieces (negligible)."""
    composite = sum(not m.spectral for m in models)
    return composite * (COMPOSITE_EVALS + 20) * COMPOSITE_EVAL_COST * n**3 / 3 / R_GEMM


def check_choice(models, n: int, memory_limit: int | None, time_limit: float | None) -> None:
    """Refuse (before any pass over the data) a set of models whose composite searches exceed
    ``time_limit`` or whose dense matrices (kernel terms, Cholesky factor, inverse: (L + 3) n²
    doubles) exceed ``memory_limit``."""
    composite = [m for m in models if not m.spectral]
    if not composite:
        return
    msg = over_time(
        f"NTKRegressor.fit of {len(composite)} composite model(s) on n={n:,} points",
        choice_seconds(models, n), time_limit,
        "fewer points, or spectral models only (model='network', 'constant' or 'scaled')",
    )
    if msg is not None:
        raise TimeLimitError(msg)
    need = 6 * n * n * F64_BYTES
    msg = over_memory(f"the composite GP's dense matrices (n={n:,})", need, memory_limit_bytes(memory_limit),
                      "memory_limit", "fit fewer points or a spectral model")
    if msg is not None:
        raise NTKMemoryError(msg)


def predict_chunked(st, budget: int, xs: Tensor) -> tuple[Tensor, Tensor]:
    """``st.predict(xs, full_cov=False)`` over chunks of test points whose working set
    (``st.point_bytes()`` per point) fits ``budget`` bytes: (mean (k', m), variance (k', m))."""
    rows = max(1, budget // max(st.point_bytes(), 1))
    if rows >= xs.shape[0]:
        return st.predict(xs, full_cov=False)
    parts = [st.predict(xs[i : i + rows], full_cov=False) for i in range(0, xs.shape[0], rows)]
    return torch.cat([a for a, _ in parts], -1), torch.cat([b for _, b in parts], -1)


def check_covariance(st, m: int, memory_limit: int | None) -> None:
    """Refuse a full predictive covariance of m test points whose matrices do not fit the limit."""
    kk = len(st.outputs)
    need = F64_BYTES * kk * (3 * m * m + 2 * m * getattr(st, "n", 0))
    msg = over_memory(
        f"the full covariance of {m:,} test points ({kk} output(s))", need,
        memory_limit_bytes(memory_limit), "memory_limit",
        "use post.variance (the diagonal, computed in chunks) or fewer test points",
    )
    if msg is not None:
        raise NTKMemoryError(msg)
