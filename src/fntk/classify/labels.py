"""Checking class labels for :class:`~fntk.LinearizedClassifier`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_labels(y: Any, n: int, k: int) -> Tensor:
    """y (n,) of any integer dtype with values in 0..C−1 (C = max(k, 2)) → int64; TypeError for
    float, bool and complex labels, ValueError for wrong shapes and out-of-range labels."""
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"y must be a tensor of int class labels, got {type(y).__name__}") from err
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"y must hold integer class labels (int64), got dtype {y.dtype}; convert whole-number "
            "labels with y.long()"
        )
    if y.dim() != 1:
        raise ValueError(f"y must be a 1-d tensor of n class labels, got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels but x has {n} points; expected y of shape ({n},)")
    C = max(k, 2)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= C:
        raise ValueError(
            f"y has labels outside [0, {C}) (min {lo}, max {hi}); the model has k={k} output"
            f"{'s' if k > 1 else ''}, so labels must be in 0..{C - 1}"
        )
    return y.long()


__all__ = ["check_labels"]
