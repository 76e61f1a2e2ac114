r"""Stochastic estimators for operators that are only available through products."""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fntk.linalg.lanczos import check_square


def hutchinson_diagonal(
    op: LinearOperator | Tensor,
    num_samples: int = 64,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Unbiased Hutchinson estimate of diag(A) = E_z[z ⊙ A z], z with i.i.d. Rademacher entries.

    Uses ``num_samples`` probes in products of ``batch_size`` columns. The variance of entry j is
    Σ_{l≠j} A_jl² / num_samples. Returns (p,).
    """
    p = check_square(op)
    if not (isinstance(num_samples, int) and num_samples > 0):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dtype, device = op.dtype, op.device
    acc = torch.zeros(p, dtype=dtype, device=device)
    done = 0
    while done < num_samples:
        b = min(batch_size, num_samples - done)
        z = torch.randint(0, 2, (p, b), generator=generator).to(device=device, dtype=dtype) * 2 - 1
        acc += (z * (op @ z)).sum(1)
        done += b
    return acc / num_samples


__all__ = ["hutchinson_diagonal"]
