r"""K-fold cross-validation of the prior precision λ (``LinearizedClassifier(prior_precision="cv")``).

For labelled data (x_i, y_i), i = 1..n, a grid Λ of λ and K stratified folds (T_f, V_f):

    CV(λ) = (1/n) Σ_f Σ_{i ∈ V_f} −log p_λ^{(f)}(y_i | x_i),

where p_λ^{(f)} is the classifier's own predictive — plug-in softmax (MAP), probit or Monte Carlo
GLM predictive (Laplace), Monte Carlo over q (VI) — fitted on T_f alone with prior N(μ₀, λ⁻¹I).
λ̂ = argmin_Λ CV(λ) (ties: the larger λ, the smaller change from μ₀); the caller then refits on
all n labels at λ̂. So the held-out NLL, not the Laplace evidence, picks λ: the evidence measured
an under-confident Laplace predictive on the digit transfer at every λ it could choose, while the
MAP's held-out NLL keeps improving down to λ ≈ 1-3 there (see the README).

Folds are stratified: each class's indices are shuffled (``seed``) and dealt round-robin to the K
folds, so every fold holds ⌊n_c/K⌋ or ⌈n_c/K⌉ labels of class c. A class with fewer than K labels
is refused (ValueError): its held-out labels could not all be scored by a model that saw the class.
Each fold's inputs are made once, and its kernels are formed once for every λ
(:func:`fntk.ntk.cached_kernels`; read from an enclosing :func:`fntk.ntk.kernel_pool` when there is one).

Cost: K·|Λ| fits on (K−1)n/K points plus the final fit (checked against the classifier's
``time_limit`` before the first fold).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fntk.ntk import cached_kernels

#: the default λ grid: 10^-2 … 10^5 in half decades (15 values)
DEFAULT_GRID = tuple(10.0 ** (e / 2) for e in range(-4, 11))
DEFAULT_FOLDS = 5
#: floor of a held-out probability inside the log (a log of 0 would make one label decide)
PROB_FLOOR = 1e-300


def check_grid(grid: Sequence[float] | None) -> tuple[float, ...]:
    """The sorted, de-duplicated λ grid (positive finite floats), or the default."""
    if grid is None:
        return DEFAULT_GRID
    try:
        values = sorted({float(v) for v in grid})
    except (TypeError, ValueError):
        raise TypeError(f"cv_grid must be a sequence of positive floats, got {grid!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"cv_grid must hold positive finite values, got {list(grid)}")
    return tuple(values)


def stratified_folds(y: Tensor, folds: int, seed: int) -> list[Tensor]:
    """Validation indices of each of K stratified folds (module docstring); ValueError when a class
    present in y (n,) has fewer than ``folds`` labels."""
    counts = torch.bincount(y.cpu())
    present = counts > 0
    smallest = int(counts[present].min())
    if smallest < folds:
        cls = int(torch.nonzero(present & (counts == smallest))[0, 0])
        raise ValueError(
            f"prior_precision='cv' with cv_folds={folds} needs at least {folds} labels per class, but "
            f"class {cls} has only {smallest}; use cv_folds <= {smallest} (at least 2) or "
            "prior_precision='marglik'"
        )
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in range(folds)]
    offset = 0
    for c in torch.nonzero(present)[:, 0].tolist():
        idx = torch.nonzero(y.cpu() == c)[:, 0]
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        for j in range(idx.numel()):  # round-robin, continuing where the previous class stopped
            parts[(offset + j) % folds].append(idx[j : j + 1])
        offset += idx.numel()
    return [torch.sort(torch.cat(p)).values.to(y.device) for p in parts]


def held_out_nll(probs: Tensor, y: Tensor) -> float:
    """Σ_i −log p_i[y_i] over a fold (probabilities (m, C), labels (m,))."""
    p = probs.double().gather(1, y.long()[:, None])[:, 0].clamp_min(PROB_FLOOR)
    return float(-p.log().sum())


def cross_validate(
    fit_predict: Callable[[Tensor, Tensor, Tensor, float], Tensor],
    x: Tensor,
    y: Tensor,
    grid: Sequence[float],
    folds: int,
    seed: int,
) -> tuple[float, list[tuple[float, float]]]:
    """λ̂ and the history [(λ, CV(λ))] over the grid (module docstring).

    Args:
        fit_predict: (training inputs, training labels, validation inputs, λ) → class probabilities
            (n_va, C) of the classifier fitted on the training fold at λ.
        x: inputs (n, ...); y: labels (n,) int64; grid: λ values; folds: K ≥ 2; seed: shuffles the folds.
    """
    n = x.shape[0]
    total = dict.fromkeys(grid, 0.0)
    with cached_kernels():
        for va in stratified_folds(y, folds, seed):
            keep = torch.ones(n, dtype=torch.bool, device=y.device)
            keep[va] = False
            tr = torch.nonzero(keep)[:, 0]
            x_tr, y_tr, x_va = x[tr], y[tr], x[va]  # one tensor each: the kernel cache keys on identity
            for lam in grid:
                total[lam] += held_out_nll(fit_predict(x_tr, y_tr, x_va, lam), y[va])
    history = [(lam, total[lam] / n) for lam in grid]
    best = min(history, key=lambda item: (item[1] if math.isfinite(item[1]) else math.inf, -item[0]))
    return best[0], history


__all__ = ["DEFAULT_GRID", "DEFAULT_FOLDS", "check_grid", "stratified_folds", "held_out_nll",
           "cross_validate"]
