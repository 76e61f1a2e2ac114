"""A checked CG solution: the true residual is verified and, when it missed, repaired by a direct
solve (warned with :class:`~fntk.NumericalWarning`, giving the residual)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from fntk.errors import NumericalWarning
from fntk.linalg.cholesky import safe_cholesky


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


__all__ = ["check_cg"]
