r"""Where the classifier computes and what it costs: the space choice, and the guards that refuse a
fit before its first pass over the data when its dense matrices exceed the memory budget or its
estimated time exceeds ``time_limit``.

Memory (n points, k outputs, p parameters, float64): function space holds the (n·k × n·k) kernel
and the Newton system of the same size (≈ 4 (nk)² · 8 bytes, allowed up to 4 × the memory
budget, as the kernel of fntk.ntk is); dense weight space holds J (n·k·p · 8 bytes, up to the
budget) and the (p × p) precision.

Time, by fntk's cost model (:mod:`fntk.ntk.costs`; F forward multiply-adds per point): function
space forms the kernel (fntk.ntk's own estimate) and runs NEWTON_STEPS Cholesky factorisations of
(n·k)³/3 flops per MAP solve; dense weight space forms J (a forward and k backward passes per
point) and factorises JᵀHJ + λI (2nkp² + p³/3 flops) per Newton step; the matrix-free solvers
cost a J·v plus a Jᵀ·u product (≈ 10·F·n flops at R_AD) per CG/L-BFGS/Lanczos step. With
``prior_precision="marglik"`` the MAP is refitted MARGLIK_REFITS times. These are typical counts,
so the estimate is a guard against hopeless fits (days), not a prediction to the second.

The last-layer backend (:func:`last_layer_plan`, :mod:`fntk.classify.last_layer`) takes over
from both spaces under ``space="auto"`` when the selection is a final linear layer on fixed
features: two forwards (training and test points) and one factorisation of
:mod:`fntk.classify.kron` per λ plus one per cold Newton solve, the cheaper of its two forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from fntk.classify import kron
from fntk.errors import NTKMemoryError, TimeLimitError
from fntk.likelihoods import Categorical, Likelihood
from fntk.linearize import Linearized
from fntk.linearize.taps import FinalLinear, analyze, final_linear
from fntk.ntk.costs import R_AD, R_GEMM, cheapest, cholesky_seconds
from fntk.ntk.methods import choose_method
from fntk.validation import over_memory, over_time

#: weight space stays dense (explicit J, (p × p) Cholesky) up to this many parameters
DENSE_MAX_PARAMS = 6000
NEWTON_STEPS = 10  # typical damped-Newton steps of one MAP solve
CG_STEPS = 20  # typical Newton-CG steps per Newton step (Eisenstat-Walker forcing)
LBFGS_STEPS = 300  # typical L-BFGS iterations (with line-search evaluations) of one MAP solve
MARGLIK_REFITS = 8  # typical MAP refits of the evidence search over λ
F64_BYTES = 8


def choose(lin: Linearized, n: int, k: int, space: str, solver: str, covariance: str) -> tuple[str, bool]:
    """(space, dense) of a fit on n points; NTKMemoryError (naming the option) when the requested
    space or dense covariance does not fit the memory budget."""
    p, nk, budget = lin.num_params, n * k, lin.memory_budget
    kernel_bytes = 4 * nk * nk * F64_BYTES
    fits_K = kernel_bytes <= 4 * budget
    if space == "auto":  # one (n·k)³ or p³ factorisation per Newton step dominates either space
        options = {"function": cholesky_seconds(nk) if fits_K and solver == "newton" else math.inf,
                   "weight": cholesky_seconds(p)}
        space = cheapest(options, "the classifier's space")
    elif space == "function" and not fits_K:
        raise NTKMemoryError(over_memory(
            f"space='function' on n={n:,} points × k={k} outputs (the {nk:,} × {nk:,} kernel and Newton "
            "system)", kernel_bytes, 4 * budget, "4 × memory_budget",
            "use space='weight' (or 'auto'), fewer points, or a larger memory_budget",
        ))
    J_bytes = nk * p * F64_BYTES
    if covariance == "auto":
        dense = p <= DENSE_MAX_PARAMS and J_bytes <= budget
    else:
        dense = covariance == "dense"
        if dense and space == "weight" and J_bytes + p * p * F64_BYTES > budget:
            raise NTKMemoryError(over_memory(
                f"covariance='dense' (J of {n:,} points × {k} outputs × {p:,} parameters and the "
                f"{p:,} × {p:,} precision)", J_bytes + p * p * F64_BYTES, budget, "memory_budget",
                "use covariance='lowrank' (matrix-free) or 'auto', or a larger memory_budget",
            ))
    return space, dense


def estimate_seconds(
    lin: Linearized, x: Tensor, space: str, dense: bool, solver: str, marglik: bool, rank: int
) -> float:
    """Estimated seconds of a MAP/Laplace fit (see the module docstring) on checked inputs x."""
    n, k, p = x.shape[0], lin.num_outputs, lin.num_params
    F = analyze(lin, x).flops
    solves = 1 + (MARGLIK_REFITS if marglik else 0)
    if space == "function":
        _, est = choose_method(lin, x, None, outputs="full")
        nk = n * k
        step = cholesky_seconds(nk) + 2.0 * nk * nk * k / R_GEMM
        return min(est.values()) + solves * NEWTON_STEPS * step
    product = 10.0 * F * n * k / R_AD
    if dense:
        jac = n * 2 * F * (1 + 2 * k) / R_AD
        return jac + solves * NEWTON_STEPS * (2.0 * n * k * p * p + p**3 / 3) / R_GEMM
    steps = LBFGS_STEPS if solver == "lbfgs" else NEWTON_STEPS * CG_STEPS
    return solves * (steps + 2 * rank + 20) * product


@dataclass
class LastLayerPlan:
    """The last-layer backend's structure, factorisation form ("dense" | "softmax") and estimate."""

    info: FinalLinear
    factor: str
    seconds: float


def last_layer_plan(
    lin: Linearized, x: Tensor, lik: Likelihood, space: str, solver: str, covariance: str, marglik: bool
) -> LastLayerPlan | None:
    """The plan of the exact last-layer backend, or None where it does not apply: an explicit
    ``space``, ``solver="lbfgs"``, ``covariance="lowrank"``, a selection that is not a verified final
    linear layer (:func:`fntk.linearize.taps.final_linear`), or factors beyond the memory budget."""
    if space != "auto" or solver != "newton" or covariance == "lowrank":
        return None
    info = final_linear(lin, x)
    if info is None:
        return None
    n, k, d = x.shape[0], info.k, info.d_in + (1 if info.bias else 0)
    forms = ("dense", "softmax") if isinstance(lik, Categorical) else ("dense",)
    options = {}
    for form in forms:
        fact, _ = kron.flops(n, k, d, form == "softmax")
        fits = kron.memory_numbers(n, k, d, form == "softmax") * F64_BYTES <= lin.memory_budget
        options[form] = (2 + (MARGLIK_REFITS if marglik else 0)) * fact / R_GEMM if fits else math.inf
    try:
        form = cheapest(options, "the last-layer factorisation")
    except NTKMemoryError:
        return None
    forward = 2 * analyze(lin, x).flops * n / R_AD
    return LastLayerPlan(info, form, forward + options[form])


def check_time(seconds: float, limit: float | None, n: int, p: int, space: str) -> None:
    """TimeLimitError when the estimate exceeds ``limit`` (None: no limit)."""
    msg = over_time(
        f"LinearizedClassifier.fit ({space}; n={n:,} points, p={p:,} parameters)", seconds, limit,
        "fit fewer points or a parameter subset (params=...)",
    )
    if msg is not None:
        raise TimeLimitError(msg)


def predict_rows(lin: Linearized, backend: object, inference: str, vi_family: str, m: int, chunk: int) -> int:
    """Test points per prediction block: weight space forms J(x) rows (k·p numbers per point, two
    copies, when dense) in blocks of at most ``chunk`` points that fit the memory budget; function
    space (fntk.ntk's test kernels) and mean-field VI size their blocks to the budget themselves."""
    if getattr(backend, "space", None) != "weight" or (inference == "vi" and vi_family == "meanfield"):
        return m
    if getattr(backend, "dense", False):
        chunk = min(chunk, max(1, lin.memory_budget // (3 * F64_BYTES * lin.num_outputs * lin.num_params)))
    return chunk


def check_joint(lin: Linearized, backend: object, m: int) -> None:
    """Refuse (NTKMemoryError) a joint predictive covariance of m test points whose working set
    does not fit the memory budget: the (m·k × m·k) covariance, its eigendecomposition and a copy
    (3 (m·k)² float64 numbers) plus the m·k × N cross terms (N = n·k for function space, p
    otherwise)."""
    k = lin.num_outputs
    mk = m * k
    if getattr(backend, "space", None) == "function":
        cross = backend.n * k + mk  # the kernel of [x; X] is (m + n)k square
        cross *= cross / mk
    else:
        cross = lin.num_params * (k if getattr(backend, "space", None) == "last-layer" else 1)
    need = F64_BYTES * (3 * mk * mk + mk * cross)
    msg = over_memory(
        f"the joint predictive covariance of m={m:,} test points × k={k} logits ({mk:,} × {mk:,})",
        need, lin.memory_budget, "memory_budget",
        "use predict_f (the per-point (k × k) covariances, in chunks), fewer test points, or a larger "
        "memory_budget",
    )
    if msg is not None:
        raise NTKMemoryError(msg)


__all__ = ["choose", "estimate_seconds", "check_time", "predict_rows", "check_joint", "last_layer_plan",
           "LastLayerPlan", "DENSE_MAX_PARAMS"]
