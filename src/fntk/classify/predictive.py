r"""The GLM predictive of a classifier with Gaussian logits: p(y = c | x) = E_{f ~ N(μ, Σ)} softmax(f)_c.

For k ≥ 2 logits (softmax) or one logit (sigmoid, classes (0, 1)), with μ (m, k), Σ (m, k, k):

- ``"probit"``: softmax(μ_c / √(1 + π/8 Σ_cc)) (MacKay's probit approximation, exact in the limit
  of a sigmoid with Σ → 0; uses only the diagonal of Σ);
- ``"mc"``: the average of softmax(μ + A ε_s) over S draws ε_s ~ N(0, I_k), Σ = A Aᵀ (A from an
  eigendecomposition, so a singular Σ is fine), seeded for reproducibility.

:func:`sample_logits` draws *joint* samples of the logits at m points from their Gaussian
N(μ, Σ_joint) with the (m·k × m·k) point-major covariance of
:meth:`fntk.LinearizedClassifier.predict_f_joint`, by the same eigendecomposition root.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fntk.linalg import psd_root

F64 = torch.float64


def class_probs(f: Tensor) -> Tensor:
    """softmax over k ≥ 2 logits, or (1 − σ, σ) for one logit: (..., C)."""
    if f.shape[-1] == 1:
        s = torch.sigmoid(f)
        return torch.cat([1 - s, s], dim=-1)
    return torch.softmax(f, dim=-1)


def sample_logits(
    mean: Tensor, cov: Tensor, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Joint draws (s, m, k) of the logits f ~ N(μ, Σ) at m points: μ (m, k), Σ (m·k × m·k)
    point-major (row i·k + c: point i, logit c), float64.

    f_s = μ + A ε_s (flattened point-major) with A = :func:`fntk.linalg.psd_root` (Σ) and base draws
    ε (m·k, s) ~ N(0, I) from ``torch.randn(m·k, s, generator=generator)`` on the CPU (torch's
    default generator when ``generator`` is None), as :meth:`fntk.gp.NTKPosterior.sample` draws
    its ε (N, m, s)."""
    m, k = mean.shape
    mean, cov = mean.to(F64), cov.to(F64)
    eps = torch.randn(m * k, num_samples, dtype=F64, generator=generator).to(mean.device)
    return (mean.reshape(-1, 1) + psd_root(cov) @ eps).T.reshape(num_samples, m, k)


def glm_predictive(
    mean: Tensor, cov: Tensor | None, link: str = "probit", num_samples: int = 100, seed: int = 0
) -> Tensor:
    """Class probabilities (m, C), float64, from logit means (m, k) and covariances (m, k, k)
    (``cov=None``: the plug-in softmax(μ)); ``link`` is ``"probit"`` or ``"mc"``."""
    mean = mean.to(F64)
    if cov is None:
        return class_probs(mean)
    cov = cov.to(F64)
    if link == "probit":
        var = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0)
        return class_probs(mean / torch.sqrt(1 + math.pi / 8 * var))
    if link != "mc":
        raise ValueError(f"link must be 'probit' or 'mc', got {link!r}")
    A = psd_root(cov)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = torch.randn(num_samples, *mean.shape, generator=g, dtype=F64).to(mean.device)
    return class_probs(mean + torch.einsum("mkl,sml->smk", A, eps)).mean(0)


__all__ = ["class_probs", "glm_predictive", "sample_logits"]
