r"""Input-space kernels added to the NTK: ARD RBF and Matérn (ν = 5/2, 3/2), in float64.

On inputs flattened to features u = vec(x) ∈ ℝᵈ, with lengthscales ℓ (d,) (ARD) or one shared ℓ,
and the scaled distance r² = Σ_d (u_d − u′_d)²/ℓ_d²:

    "rbf":       k(u, u′) = exp(−r²/2)
    "matern52":  k(u, u′) = (1 + √5 r + 5r²/3) exp(−√5 r)
    "matern32":  k(u, u′) = (1 + √3 r) exp(−√3 r)

(unit amplitude: the GP multiplies by its own scale). ARD (one ℓ per input dimension) is used for
inputs with at most :data:`ARD_MAX_DIMS` features; wider inputs (images) share one lengthscale,
since a lengthscale per pixel is not identifiable from a few hundred points. Lengthscales start at
the median pairwise distance along each dimension (shared: of the Euclidean distance).

Differentiable in the log-lengthscales (the hyperparameter search takes autograd gradients); the
Matérn distance r is computed as √(r² + 0) with a zero-safe square root (its derivative at r = 0
is finite for ν ≥ 3/2, where k is differentiable in u).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

INPUT_KERNELS = ("rbf", "matern52", "matern32")
#: inputs with more features than this get one shared lengthscale instead of ARD
ARD_MAX_DIMS = 32
F64 = torch.float64


def features(x: Tensor) -> Tensor:
    """Inputs (n, *feature_shape) as float64 features (n, d); dict inputs are refused (TypeError)."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"the input kernels ({', '.join(INPUT_KERNELS)}) need inputs x as one tensor (n, ...), got "
            f"{type(x).__name__} (dict inputs have no feature vector); choose a gp_model without an "
            "input kernel (e.g. gp_model='ntk')"
        )
    return x.reshape(x.shape[0], -1).to(F64)


def num_lengthscales(d: int) -> int:
    """ℓ per dimension for d ≤ ARD_MAX_DIMS, else one."""
    return d if d <= ARD_MAX_DIMS else 1


def median_lengthscales(U: Tensor) -> Tensor:
    """Initial lengthscales (num_lengthscales(d),): per-dimension median |u_id − u_jd| over pairs i < j
    (ARD) or the median Euclidean distance (shared); 1 where that median is 0 or n < 2."""
    n, d = U.shape
    m = num_lengthscales(d)
    if n < 2:
        return U.new_ones(m)
    i, j = torch.triu_indices(n, n, 1, device=U.device)
    # O(n²) memory, one dimension at a time: the pairwise differences of all d features at once
    # took n²d/2 numbers (18 GB for 1,500 faces of 2,025 pixels)
    if m == d:
        med = torch.stack([(U[i, c] - U[j, c]).abs().median() for c in range(d)])
    else:
        med = sq_dist(U, U)[i, j].sqrt().median().reshape(1)
    return torch.where(med > 0, med, torch.ones_like(med))


def sq_dist(U1: Tensor, U2: Tensor) -> Tensor:
    """Unscaled squared Euclidean distances (n1, n2), for a shared lengthscale: r² = this/ℓ²."""
    c = U1.mean(0)  # centred: less cancellation in ‖a‖² + ‖b‖² − 2a·b
    A, B = U1 - c, U2 - c
    return (A.square().sum(-1)[:, None] + B.square().sum(-1)[None, :] - 2 * A @ B.T).clamp_min(0)


def scaled_sq_dist(U1: Tensor, U2: Tensor, log_ls: Tensor, D2: Tensor | None = None) -> Tensor:
    """r² (n1, n2) = Σ_d (u_d − u′_d)²/ℓ_d², clamped at 0 (the expansion can round below); with one
    lengthscale, ``D2`` = :func:`sq_dist` (U1, U2) may be passed precomputed (O(n²) per call)."""
    if log_ls.numel() == 1:
        return (sq_dist(U1, U2) if D2 is None else D2) * torch.exp(-2 * log_ls)
    ls = log_ls.exp()
    return sq_dist(U1 / ls, U2 / ls)


def _safe_sqrt(t: Tensor) -> Tensor:
    """√t with a finite derivative at t = 0 (0 there instead of ∞)."""
    pos = t > 0
    return torch.where(pos, torch.where(pos, t, torch.ones_like(t)).sqrt(), torch.zeros_like(t))


def input_kernel(kind: str, U1: Tensor, U2: Tensor, log_ls: Tensor, D2: Tensor | None = None) -> Tensor:
    """k(U1, U2) (n1, n2) for features U1 (n1, d), U2 (n2, d) and log-lengthscales (d,) or (1,)
    (``D2``: see :func:`scaled_sq_dist`)."""
    r2 = scaled_sq_dist(U1, U2, log_ls, D2)
    if kind == "rbf":
        return torch.exp(-0.5 * r2)
    r = _safe_sqrt(r2)
    if kind == "matern52":
        s = math.sqrt(5.0) * r
        return (1 + s + s * s / 3) * torch.exp(-s)
    if kind == "matern32":
        s = math.sqrt(3.0) * r
        return (1 + s) * torch.exp(-s)
    raise ValueError(f"input kernel must be one of {INPUT_KERNELS}, got {kind!r}")


__all__ = ["INPUT_KERNELS", "ARD_MAX_DIMS", "features", "num_lengthscales", "median_lengthscales",
           "sq_dist", "scaled_sq_dist", "input_kernel"]
