r"""K-fold cross-validation of the prior precision λ of a linearized MAP classifier, with the
linearization point rebuilt on every training fold.

For labelled data (x_i, y_i), i = 1..n, a grid Λ of λ and K stratified folds (T_f, V_f):

    CV(λ) = (1/n) Σ_f Σ_{i ∈ V_f} −log softmax(f_lin^{(f)}(x_i; w*_{f,λ}))_{y_i},
    w*_{f,λ} = argmin_w Σ_{j ∈ T_f} CE(f_lin^{(f)}(x_j; w), y_j) + (λ/2)‖w − θ̂_f‖²,

where θ̂_f are the weights of ``build(T_f)`` (everything of the network that depends on labels,
e.g. a linear head fitted by logistic regression, is refitted on the training fold alone, so that
the held-out fold never informs its own prediction) and f_lin^{(f)} its linearization. The chosen
λ̂ = argmin_Λ CV(λ) (ties: the larger λ, i.e. the smaller change from θ̂); the caller refits on all
n labels at λ̂. Each fold's kernel on [T_f; V_f] is formed once and serves every λ
(:func:`fntk.ntk.kernel_pool`).

A class with fewer than K labels is refused (ValueError): a stratified K-fold split needs at
least K items per class, and a training fold without some class cannot score it. (With one label
per class no split has a training fold containing the held-out image's class: leave-one-out is
uninformative there, and this routine refuses instead of guessing.)

Why not ``LinearizedClassifier(prior_precision="cv")`` (:mod:`fntk.classify.cv`): it keeps one
θ̂ for every fold. When θ̂ itself was fitted to these labels (the probe head of ``fntk run
unsup``), every held-out fold has then informed the model that predicts it, which favours large λ
(no change from θ̂). The folds here come from :func:`fntk.baselines.finetune.kfold_splits`, the
splitter of the probe's and of fine-tuning's cross-validation: with the same K and seed,
fine-tuning's CV sees exactly these folds.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fntk import metrics
from fntk.baselines.finetune import kfold_splits
from fntk.classify import LinearizedClassifier
from fntk.linearize import Linearized
from fntk.ntk import kernel_pool


@dataclass
class CVResult:
    """The chosen λ, the mean held-out NLL CV(λ) of every λ tried, K and the seconds spent."""

    prior_precision: float
    scores: dict[float, float] = field(default_factory=dict)
    folds: int = 0
    seconds: float = 0.0


def check_folds(y: Tensor, folds: int) -> None:
    """Raise ValueError unless every class present in y (n,) has at least ``folds`` ≥ 2 labels."""
    if folds < 2:
        raise ValueError(f"cross-validation needs folds >= 2, got {folds}")
    counts = torch.bincount(torch.as_tensor(y).cpu())
    smallest = int(counts[counts > 0].min())
    if smallest < folds:
        raise ValueError(
            f"{folds}-fold cross-validation of the prior precision needs at least {folds} labels per "
            f"class, but a class has only {smallest}; use fewer folds or prior_precision='marglik'"
        )


def cv_prior_precision(
    build: Callable[[Tensor], nn.Module],
    x: Tensor,
    y: Tensor,
    grid: Sequence[float],
    folds: int = 3,
    seed: int = 0,
    tol: float = 1e-4,
) -> CVResult:
    """λ̂ by K-fold CV of the held-out NLL of the linearized MAP (see the module doc).

    Args:
        build: training-fold indices (n_f,) int64 → the network θ̂_f to linearize (all its
            parameters adapt), e.g. an encoder with a head refitted on those labels.
        x: (n, *features) inputs; y: (n,) int labels.
        grid: the λ values tried (positive).
        folds: K (stratified; every class needs at least K labels, else ValueError).
        seed: shuffles the folds.
        tol: MAP tolerance ‖∇_w Ψ‖ of the fold fits (looser than the final fit's: the held-out
            NLL does not need the last digits of w*).

    Returns:
        :class:`CVResult` with λ̂ and CV(λ) for every λ.
    """
    t0 = time.perf_counter()
    check_folds(y, folds)
    grid = sorted({float(v) for v in grid})
    if not grid or any(not (math.isfinite(v) and v > 0) for v in grid):
        raise ValueError(f"the λ grid must hold positive finite values, got {list(grid)}")
    total = dict.fromkeys(grid, 0.0)
    for tr, va in kfold_splits(x.shape[0], folds, seed, torch.as_tensor(y)):
        tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
        lin = Linearized(build(tr_t))
        xtr, xva = x[tr_t], x[va_t]
        with kernel_pool(lin, torch.cat([xtr, xva])):
            for lam in grid:
                clf = LinearizedClassifier(lin, inference="map", prior_precision=lam, tol=tol)
                with warnings.catch_warnings():  # a fold fit short of tol still scores its fold
                    warnings.filterwarnings("ignore", "MAP solve stopped", RuntimeWarning)
                    probs = clf.fit(xtr, y[tr_t]).predict_proba(xva)
                nll = metrics.categorical_nll(probs.double(), y[va_t])
                total[lam] += nll * len(va) if math.isfinite(nll) else math.inf
    scores = {lam: total[lam] / x.shape[0] for lam in grid}
    best = min(grid, key=lambda lam: (scores[lam], -lam))
    return CVResult(best, scores, folds, time.perf_counter() - t0)


__all__ = ["CVResult", "check_folds", "cv_prior_precision"]
