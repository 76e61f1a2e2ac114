r"""Regression targets: checking y, and standardising the residuals r = y − m(X) scale-robustly.

For each output the GP works on z = (r − μ)/σ with μ the mean and σ the standard deviation of r.
Both are computed on r / a, with a = 2^⌊log₂ max|r|⌋ a power of two (so the division is exact and
nothing overflows or underflows: max|r/a| ∈ [1, 2)), then scaled back: μ = a·mean(r/a),
σ = a·std(r/a). Scaling y by a power of two therefore scales every prediction exactly, and by any
factor c with |c| in 1e-150..1e150 up to rounding. Residuals that are constant to within rounding
(σ ≤ 1e-12·max|r|, a *relative* test) are standardised by σ = max|r| instead (z ≈ 0).

The standard deviation must lie in [SD_MIN, SD_MAX] = [1e-152, 1e152], so that variances in the
data's units (σ² times the standardised kernel scale, noise and posterior variance) are normal
float64 numbers; outside it fit refuses y with a ValueError saying how to rescale it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

F64 = torch.float64
#: relative spread below which residuals count as constant (rounding of their mean)
CONSTANT_RTOL = 1e-12
SD_MIN, SD_MAX = 1e-152, 1e152


def check_targets(y: Any, n: int, kk: int) -> Tensor:
    """y (n,) [or (n, kk)] of any real dtype → (n, kk) float64; clear errors for wrong types,
    shapes and non-finite values. Every integer dtype is accepted (converted exactly where it fits
    a float64); bool and complex are refused."""
    expected = f"({n},)" if kk == 1 else f"({n}, {kk})"
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"y must be a tensor or array of shape {expected}, got {type(y).__name__}"
            ) from err
    if y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"y must be real-valued (a floating or integer dtype), got dtype {y.dtype}"
            + ("; pass y.real if the imaginary part is zero" if y.is_complex() else "; pass y.double()")
        )
    shape = tuple(y.shape)
    if y.dim() == 0 or y.shape[0] != n:
        got = "a scalar" if y.dim() == 0 else f"{y.shape[0]} rows (shape {shape})"
        raise ValueError(f"y has {got} but x has n={n} points; expected y of shape {expected}")
    if kk == 1 and y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if (kk == 1 and y.dim() != 1) or (kk > 1 and (y.dim() != 2 or y.shape[1] != kk)):
        raise ValueError(f"y must have shape {expected} for {kk} output(s), got {shape}")
    y = y.to(F64).reshape(n, kk)
    bad = ~torch.isfinite(y).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"y contains NaN or Inf (first at index {int(bad.nonzero()[0, 0])})")
    return y


def standardise(resid: Tensor, what: str = "y") -> tuple[Tensor, Tensor]:
    """(μ (k',), σ (k',)) of residuals (n, k') float64, robust to their scale (module docstring)."""
    if not bool(torch.isfinite(resid).all()):
        raise ValueError(
            f"{what} minus the prior mean overflows float64 (|{what}| is near 1.8e308); rescale {what}"
        )
    big = resid.abs().amax(0)
    # a = 2^⌊log2 big⌋ exactly (frexp: big = m·2^e, m ∈ [0.5, 1)); a = 1 for all-zero columns
    _, e = torch.frexp(big)
    a = torch.where(big > 0, torch.ldexp(torch.ones_like(big), e - 1), torch.ones_like(big))
    r = resid / a
    mu = r.mean(0)
    sd = r.std(0, correction=0)
    const = sd <= CONSTANT_RTOL * r.abs().amax(0)
    sd = torch.where(const, torch.where(big > 0, r.abs().amax(0), torch.ones_like(sd)), sd)
    mu, sd = mu * a, sd * a
    for j in range(sd.shape[0]):
        s = float(sd[j])
        if not SD_MIN <= s <= SD_MAX:
            col = f" (output column {j})" if sd.shape[0] > 1 else ""
            raise ValueError(
                f"{what}{col} has a residual standard deviation of {s:.3g}, outside "
                f"[{SD_MIN:g}, {SD_MAX:g}]: its variances would not be representable in float64; "
                f"rescale {what} (e.g. {what} / {s:.0e}) and scale the predictions back"
            )
    return mu, sd


__all__ = ["check_targets", "standardise", "SD_MIN", "SD_MAX", "CONSTANT_RTOL"]
