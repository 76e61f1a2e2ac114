"""A square root of a symmetric positive semi-definite matrix, for joint Gaussian samples."""

from __future__ import annotations

import torch
from torch import Tensor


def psd_root(cov: Tensor) -> Tensor:
    """A root A (..., N, N) with A Aᵀ = Σ of a symmetric PSD Σ (..., N, N): A = Q diag(√max(e, 0))
    from the eigendecomposition ½(Σ + Σᵀ) = Q diag(e) Qᵀ.

    A singular Σ needs no jitter (posterior covariances at repeated or training points are singular
    up to rounding; a Cholesky would add a jitter and so sample a different covariance); the
    eigenvalues that rounding made negative are set to 0. Costs one ``eigh`` (≈ 3-4 Choleskys)."""
    ev, Q = torch.linalg.eigh(0.5 * (cov + cov.mT))
    return Q * ev.clamp_min(0).sqrt()[..., None, :]


__all__ = ["psd_root"]
