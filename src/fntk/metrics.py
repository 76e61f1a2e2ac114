"""Evaluation metrics: tensors in, Python floats out (computed in float64).

Regression (n points): :func:`mse`, :func:`rmse`, :func:`gaussian_nll`, :func:`interval_coverage`.
Vectors may be (n,) or (n, 1). Classification (n points, C classes): :func:`accuracy`,
:func:`categorical_nll`, :func:`ece`, :func:`brier` take probabilities (n, C) (rows summing to 1)
and integer labels (n,). Shape or value mistakes raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


def _vector(t: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(t).detach()
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (n,) or (n, 1), got {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return t.to(torch.float64)


def _same_n(*pairs: tuple[str, Tensor]) -> None:
    n = pairs[0][1].shape[0]
    for name, t in pairs[1:]:
        if t.shape[0] != n:
            desc = ", ".join(f"{k} {tuple(v.shape)}" for k, v in pairs)
            raise ValueError(f"{name} must have as many points as {pairs[0][0]}: got {desc}")
    if n == 0:
        raise ValueError(f"{pairs[0][0]} is empty")


def mse(pred: Tensor, y: Tensor) -> float:
    """Mean squared error of predictions pred (n,) against targets y (n,)."""
    p, t = _vector(pred, "pred"), _vector(y, "y")
    _same_n(("pred", p), ("y", t))
    return float((p - t).square().mean())


def rmse(pred: Tensor, y: Tensor) -> float:
    """Root mean squared error (same shapes as :func:`mse`)."""
    return math.sqrt(mse(pred, y))


def _mean_var_y(mean: Tensor, var: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m, v, t = _vector(mean, "mean"), _vector(var, "var"), _vector(y, "y")
    _same_n(("mean", m), ("var", v), ("y", t))
    if not bool((v > 0).all()):
        raise ValueError(f"var must be positive everywhere, got min {float(v.min()):.3g}")
    return m, v, t


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    """Mean negative log density of y under independent N(mean, var): (1/n) Σ ½[log 2π v + (y−m)²/v].

    Args:
        mean: (n,) predictive means.
        var: (n,) predictive variances (> 0; include the observation noise for noisy targets).
        y: (n,) targets.
    """
    m, v, t = _mean_var_y(mean, var, y)
    return float(0.5 * (_LOG_2PI + v.log() + (t - m).square() / v).mean())


def interval_coverage(mean: Tensor, var: Tensor, y: Tensor, level: float = 0.95) -> float:
    """Fraction of targets inside the central ``level`` interval mean ± z·√var of N(mean, var).

    z = Φ⁻¹((1 + level) / 2) (1.95996… for 95 %). Shapes as :func:`gaussian_nll`.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    m, v, t = _mean_var_y(mean, var, y)
    z = float(torch.special.ndtri(torch.tensor((1.0 + level) / 2.0, dtype=torch.float64)))
    return float(((t - m).abs() <= z * v.sqrt()).double().mean())


def _labels(y: Tensor, n: int | None = None, num_classes: int | None = None) -> Tensor:
    y = torch.as_tensor(y).detach()
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y must be integer labels of shape (n,), got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must be integer class labels, got dtype {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels but the predictions have {n} rows")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got range {int(y.min())}..{int(y.max())}")
    return y.long()


def _probs(probs: Tensor) -> Tensor:
    p = torch.as_tensor(probs).detach()
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (n, C), got {tuple(p.shape)}")
    if p.shape[0] == 0:
        raise ValueError("probs is empty")
    p = p.to(torch.float64)
    if bool((p < 0).any()) or not torch.allclose(p.sum(1), torch.ones((), dtype=p.dtype), atol=1e-4):
        raise ValueError(
            "probs must be non-negative with rows summing to 1 (pass softmax(logits), not logits)"
        )
    return p


def accuracy(pred: Tensor, y: Tensor) -> float:
    """Fraction of correct predictions.

    Args:
        pred: (n, C) class scores or probabilities (argmax is taken), or (n,) predicted labels.
        y: (n,) integer labels.
    """
    pred = torch.as_tensor(pred).detach()
    if pred.ndim == 2:
        labels = pred.argmax(1)
    elif pred.ndim == 1:
        labels = _labels(pred)
    else:
        raise ValueError(f"pred must be (n, C) scores or (n,) labels, got shape {tuple(pred.shape)}")
    t = _labels(y, labels.shape[0])
    if t.numel() == 0:
        raise ValueError("y is empty")
    return float((labels == t).double().mean())


def categorical_nll(probs: Tensor, y: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log probability of the true class, −(1/n) Σ log max(p_i[y_i], eps).

    Args:
        probs: (n, C) predictive probabilities.
        y: (n,) integer labels in 0..C−1.
        eps: floor on the probability (avoids infinite NLL for a zero probability).
    """
    p = _probs(probs)
    t = _labels(y, p.shape[0], p.shape[1])
    return float(-p.gather(1, t[:, None]).clamp_min(eps).log().mean())


def ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top label with ``n_bins`` equal-width confidence bins.

    ECE = Σ_b (|B_b| / n) · |acc(B_b) − conf(B_b)|, with confidence = max_c p_ic, bins (lo, hi]
    over [0, 1] (a confidence of exactly 0 goes to the first bin).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _probs(probs)
    t = _labels(y, p.shape[0], p.shape[1])
    conf, pred = p.max(1)
    correct = (pred == t).double()
    # bin b holds conf in (b/B, (b+1)/B]
    b = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    n = p.shape[0]
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, conf)
    return float((acc_sum - conf_sum).abs().sum() / n)  # Σ_b |B_b|/n · |acc_b − conf_b|


def brier(probs: Tensor, y: Tensor) -> float:
    """Multi-class Brier score, (1/n) Σ_i Σ_c (p_ic − 1[y_i = c])² (in [0, 2]).

    Args:
        probs: (n, C) predictive probabilities.
        y: (n,) integer labels in 0..C−1.
    """
    p = _probs(probs)
    t = _labels(y, p.shape[0], p.shape[1])
    onehot = torch.nn.functional.one_hot(t, p.shape[1]).to(p.dtype)
    return float((p - onehot).square().sum(1).mean())


def regression_metrics(mean: Tensor, var: Tensor, y: Tensor, level: float = 0.95) -> dict[str, float]:
    """``{"mse", "rmse", "nll", "coverage"}`` for a Gaussian predictive (shapes as :func:`gaussian_nll`)."""
    return {
        "mse": mse(mean, y),
        "rmse": rmse(mean, y),
        "nll": gaussian_nll(mean, var, y),
        "coverage": interval_coverage(mean, var, y, level),
    }


def classification_metrics(probs: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, float]:
    """``{"accuracy", "nll", "ece", "brier"}`` for predictive probabilities (n, C) and labels (n,)."""
    return {
        "accuracy": accuracy(probs, y),
        "nll": categorical_nll(probs, y),
        "ece": ece(probs, y, n_bins),
        "brier": brier(probs, y),
    }
