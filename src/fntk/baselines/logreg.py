"""Last-layer multinomial logistic regression on a network's penultimate features (k-fold CV of λ)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from fntk.baselines.finetune import kfold_splits, last_module


# ----------------------------------------------------------------------------- last-layer logistic regression
@torch.no_grad()
def penultimate_features(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """The input of the model's last parametrised module (see :func:`last_layer_names`), in eval mode.

    Args:
        x: (n, *input_shape). Returns (n, d) features (d = 200 for LeNet5), detached.
    """
    module = model.get_submodule(last_module(model))
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            model(x[start : start + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)


@dataclass
class LogRegFit:
    """A fitted multinomial logistic regression on features.

    Attributes:
        classifier: the fitted ``sklearn.linear_model.LogisticRegression``.
        weight_decay: the chosen λ of the objective Σ_i CE_i + (λ/2)·‖W‖² (sklearn C = 1/λ).
        num_classes: C (columns of :meth:`predict_proba`).
        cv_nll: mean held-out NLL of every λ tried (empty when λ was given).
    """

    classifier: object
    weight_decay: float
    num_classes: int
    cv_nll: dict[float, float] = field(default_factory=dict)

    def predict_proba(self, features: Tensor) -> Tensor:
        """(m, d) features → (m, C) float64 probabilities (0 for classes absent from training)."""
        return _proba(self.classifier, features, self.num_classes)

    def predict(self, features: Tensor) -> Tensor:
        """(m, d) → (m,) int64 labels."""
        return self.predict_proba(features).argmax(1)


def _proba(clf, features: Tensor, C: int) -> Tensor:
    p = clf.predict_proba(torch.as_tensor(features).detach().double().cpu().numpy())
    out = np.zeros((p.shape[0], C))
    out[:, clf.classes_] = p
    return torch.from_numpy(out)


def last_layer_logreg(
    features: Tensor,
    y: Tensor,
    weight_decay: float | Sequence[float] | None = None,
    num_classes: int | None = None,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 2000,
    tol: float = 1e-6,
    default_weight_decay: float = 1.0,
) -> LogRegFit:
    """Multinomial logistic regression (with intercept) on fixed features, λ chosen by k-fold CV.

    Args:
        features: (n, d) features of the labelled images (e.g. :func:`penultimate_features`).
        y: (n,) integer labels.
        weight_decay: a float (no CV), a grid, or ``None`` for the default grid 10^{-3..3} (13 values).
            λ weights the penalty of Σ_i CE_i + (λ/2)‖W‖².
        num_classes: C (default max(y) + 1).
        folds: k of the k-fold CV, stratified with k = min(folds, smallest class count) when every
            class has at least 2 items, else plain k-fold. The score is the mean held-out NLL over
            held-out items whose class occurs in the training fold; ties go to the larger λ.
        max_iter, tol: L-BFGS limits of each fit (sklearn's ``lbfgs`` solver; BLAS/OpenMP pools
            are limited to one thread during the fits, which is much faster for these small problems).
        default_weight_decay: used when no held-out item can be scored (one label per class);
            λ = 1 is scikit-learn's default C = 1. ``cv_nll`` is then empty.

    Returns:
        A :class:`LogRegFit` refit on all n points with the chosen λ.
    """
    with threadpool_limits(1):
        return _logreg(
            features, y, weight_decay, num_classes, folds, seed, max_iter, tol, default_weight_decay
        )


def _logreg(
    features, y, weight_decay, num_classes, folds, seed, max_iter, tol, default_weight_decay
) -> LogRegFit:
    X = torch.as_tensor(features).detach().double().cpu().numpy()
    yt = torch.as_tensor(y).detach().cpu()
    if yt.dtype.is_floating_point or yt.ndim != 1 or X.ndim != 2 or X.shape[0] != yt.shape[0]:
        raise ValueError(f"need features (n, d) and integer labels (n,), got {X.shape} and {tuple(yt.shape)}")
    C = int(num_classes if num_classes is not None else int(yt.max()) + 1)
    Y = yt.numpy()

    def fit(lam: float, idx: np.ndarray):
        clf = LogisticRegression(C=1.0 / lam, max_iter=max_iter, tol=tol)
        if len(np.unique(Y[idx])) == 1:  # sklearn cannot fit one class: predict it with certainty
            clf = _Constant(int(Y[idx][0]))
        return clf.fit(X[idx], Y[idx])

    if weight_decay is not None and np.ndim(weight_decay) == 0:
        lam = float(weight_decay)
        return LogRegFit(fit(lam, np.arange(len(Y))), lam, C)
    grid = [float(v) for v in (np.logspace(-3, 3, 13) if weight_decay is None else weight_decay)]
    cv: dict[float, float] = {}
    splits = kfold_splits(len(Y), folds, seed, yt.long())
    # Held-out items of a class absent from the training fold say nothing about λ: not scored.
    scored = [(tr, va[np.isin(Y[va], Y[tr])]) for tr, va in splits]
    scored = [(tr, va) for tr, va in scored if len(va)]
    if not scored:  # e.g. one label per class: CV is uninformative
        return LogRegFit(fit(default_weight_decay, np.arange(len(Y))), default_weight_decay, C)
    for lam in grid:
        nll, count = 0.0, 0
        for tr, va in scored:
            p = _proba(fit(lam, tr), torch.from_numpy(X[va]), C)
            nll -= float(np.log(np.clip(p[np.arange(len(va)), Y[va]].numpy(), 1e-12, None)).sum())
            count += len(va)
        cv[lam] = nll / count
    best = min(grid, key=lambda lam: (cv[lam], -lam))
    return LogRegFit(fit(best, np.arange(len(Y))), best, C, cv)


class _Constant:
    """Stand-in classifier for a training fold with a single class."""

    def __init__(self, label: int):
        self.classes_ = np.array([label])

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return np.ones((len(X), 1))


__all__ = ["LogRegFit", "last_layer_logreg", "penultimate_features"]
