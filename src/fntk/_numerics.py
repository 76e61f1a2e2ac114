"""Numerical safeguards shared by fntk's solvers: escalating-jitter Cholesky and checked CG.

Both warn with :class:`NumericalWarning` (a subclass of linear_operator's, itself a
``RuntimeWarning``) stating what was done: the jitter
added to the diagonal, or the residual CG stopped at and how it was repaired.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from linear_operator.utils.warnings import NumericalWarning as _LONumericalWarning
from torch import Tensor

#: relative jitter tried first (times the mean |diagonal|); multiplied by 10 per retry
JITTER_START = 1e-10
JITTER_TRIES = 8


class NumericalWarning(_LONumericalWarning):
    """A computation needed a numerical repair (jitter, fallback solve); the message says which."""


def safe_cholesky(
    A: Tensor, what: str = "matrix", start: float = JITTER_START, tries: int = JITTER_TRIES
) -> Tensor:
    """Lower Cholesky factor of the symmetric (batch of) matrix A (..., N, N).

    When A is not numerically positive definite, jitter ε·mean|diag(A)| is added to the diagonal,
    with ε = ``start``, 10·start, ... for up to ``tries`` attempts, and a :class:`NumericalWarning`
    states the absolute jitter added. Raises ValueError (never a bare torch error) if A contains
    NaN/Inf or stays indefinite.
    """
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"{what} contains NaN or Inf; cannot factorise it")
    L, info = torch.linalg.cholesky_ex(A)
    if not bool((info > 0).any()):
        return L
    scale = A.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(A.dtype).tiny)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    eps = start
    for _ in range(tries):
        jitter = eps * scale
        L, info = torch.linalg.cholesky_ex(A + jitter[..., None, None] * eye)
        if not bool((info > 0).any()):
            warnings.warn(
                f"{what} is not numerically positive definite: added jitter "
                f"{float(jitter.max()):.3e} to its diagonal ({eps:.0e} × its mean diagonal)",
                NumericalWarning,
                stacklevel=2,
            )
            return L
        eps *= 10
    raise ValueError(
        f"{what} is not positive definite even with jitter {float(jitter.max()):.3e} on its diagonal "
        f"({eps / 10:.0e} × its mean diagonal); check the inputs and hyperparameters (noise, prior precision)"
    )


def check_cg(
    matmul: Callable[[Tensor], Tensor],
    rhs: Tensor,
    sol: Tensor,
    tol: float,
    memory_budget: int,
    what: str = "CG",
) -> Tensor:
    """Check a CG solution of M sol = rhs (rhs, sol: (N,)); repair it if it missed ``tol``.

    The relative residual ‖rhs − M sol‖/‖rhs‖ is computed with one product. When it exceeds
    ``max(tol, 1e-12)`` × 10 (CG's own stopping test is on a preconditioned/updated residual), a
    :class:`NumericalWarning` gives the residual, and, when the dense N × N matrix fits
    ``memory_budget`` bytes (three copies in float64), M is formed by N products with the identity
    (in blocks) and the system solved directly by jittered Cholesky; otherwise the CG result is
    kept.
    """
    norm = float(rhs.norm())
    if norm == 0.0:
        return sol
    res = float((rhs - matmul(sol[:, None])[:, 0]).norm()) / norm
    if res <= 10 * max(tol, 1e-12) and res == res:
        return sol
    N = rhs.shape[0]
    direct = 3 * 8 * N * N <= memory_budget
    warnings.warn(
        f"{what} missed its tolerance {tol:.1e}: relative residual {res:.3e}; "
        + (
            f"falling back to a direct solve of the {N} × {N} system"
            if direct
            else f"keeping the CG result ({N} × {N} dense does not fit the memory budget)"
        ),
        NumericalWarning,
        stacklevel=2,
    )
    if not direct:
        return sol
    eye = torch.eye(N, dtype=rhs.dtype, device=rhs.device)
    block = max(1, min(N, memory_budget // max(1, 8 * N * 4)))
    M = torch.cat([matmul(eye[:, i : i + block]) for i in range(0, N, block)], dim=1)
    M = 0.5 * (M + M.T)
    L = safe_cholesky(M, f"the {N} × {N} system of the direct fallback")
    return torch.cholesky_solve(rhs[:, None], L)[:, 0]
