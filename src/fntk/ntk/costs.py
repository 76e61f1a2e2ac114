"""The one cost model behind every "auto" choice of fntk: the NTK method, NTKOperator's dense
cache, the GP's space and solver, the classifier's space, the gpytorch prediction strategy.

Estimated seconds from flop counts at two measured rates (large matrix products and LAPACK at
``R_GEMM``, vmapped forward/backward passes at ``R_AD``; memory-bound element operations count
``ELEM`` flops each), and :func:`cheapest` picks the fastest option that fits its memory limit
(options that do not fit are given ``inf``).
"""

from __future__ import annotations

import math

from fntk.errors import NTKMemoryError

R_GEMM = 1.0e11  # flop/s of large matrix products (float64, measured on the development machine)
R_AD = 2.0e10  # flop/s of vmapped forward/backward passes
ELEM = 30.0  # flop-equivalents of one memory-bound element operation


def cheapest(options: dict, what: str) -> object:
    """The key of the smallest finite estimate (ties: the first in ``options``' order); an
    NTKMemoryError naming ``what`` when nothing fits."""
    best = min(options, key=lambda key: options[key])
    if math.isinf(options[best]):
        raise NTKMemoryError(f"{what}: no option fits the memory limit ({', '.join(map(str, options))})")
    return best


def cholesky_seconds(N: int, count: int = 1) -> float:
    """``count`` Cholesky factorisations of N × N matrices: N³/3 flops each."""
    return count * N**3 / 3 / R_GEMM


def ntk_product_seconds(flops: float, n1: int, n2: int, r: int, vjp: float = 1.0, jvp: float = 1.0) -> float:
    """One matrix-free K V with r columns: a forward and r backward passes over x2, r forward-mode
    passes over x1 (about 2 units each), ``flops`` the forward multiply-adds per point; ``vjp`` and
    ``jvp`` price the validated paths of the two halves (``Linearized.slowdown``, 1 = fast path)."""
    return 2 * flops * (n2 * (1 + 2 * r) * vjp + 2 * n1 * r * jvp) / R_AD


def ggn_product_seconds(flops: float, n: int, r: int, jvp: float = 1.0, vjp: float = 1.0) -> float:
    """One autodiff GGN product with r columns: a shared forward, then per column a forward-mode
    pass and a backward pass (about 2 units each), priced by the validated paths' slowdowns."""
    return 2 * flops * n * (1 + 2 * r * (jvp + vjp)) / R_AD


def tapped_product_seconds(flops: float, n: int, k: int, r: int, column_flops: float, cached: bool,
                           directions: int = 2, tap_flops: float = 0.0, shared: int = 1) -> float:
    """Tapped products (:mod:`fntk.linearize.tapped`) with r columns: the taps (a forward and k
    backward passes per point, plus ``tap_flops`` of GEMMs forming explicit rows over positions)
    unless kept from an earlier product, then ``directions`` GEMM passes (J V and/or Jᵀ U) of
    ``column_flops`` each per column. ``shared``: how many products share the taps — an operator
    whose taps are kept counts its products so far and this one, so that repeated products (CG,
    Lanczos) take the taps once they pay and a single product the cheapest path."""
    taps = 0.0 if cached else (2 * flops * n * (1 + 2 * k) / R_AD + tap_flops / R_GEMM) / shared
    return taps + directions * r * column_flops / R_GEMM


__all__ = ["R_GEMM", "R_AD", "ELEM", "cheapest", "cholesky_seconds", "ntk_product_seconds",
           "ggn_product_seconds", "tapped_product_seconds"]
