"""The small base of fntk's linear_operator ``LinearOperator``s and their column plumbing.

Operators are built on a :class:`~fntk.Linearized` ``self.lin`` (dtype and device are its);
right-hand sides (N,) or (*b, N, r) are turned into columns (N, prod(b)·r) and back.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fntk.linearize import Linearized


def as_columns(rhs: Tensor) -> tuple[Tensor, tuple[int, ...], bool]:
    """(*b, N, r) or (N,) → (N, prod(b)·r), remembering how to undo it."""
    if rhs.dim() == 1:
        return rhs[:, None], (), True
    batch = tuple(rhs.shape[:-2])
    N, r = rhs.shape[-2:]
    cols = rhs.reshape(-1, N, r).permute(1, 0, 2).reshape(N, -1)
    return cols, batch + (r,), False


def from_columns(out: Tensor, shape: tuple[int, ...], vector: bool) -> Tensor:
    """Inverse of :func:`as_columns` for a result with M rows."""
    if vector:
        return out[:, 0]
    M = out.shape[0]
    *batch, r = shape
    return out.reshape(M, -1, r).permute(1, 0, 2).reshape(*batch, M, r)


def check_output(lin: Linearized, output: int | str) -> int | str:
    k = lin.num_outputs
    if output == "full":
        return output
    if isinstance(output, bool) or not isinstance(output, int):
        raise ValueError(f"outputs must be 'full' or an int output index, got {output!r}")
    if not -k <= output < k:
        raise ValueError(f"outputs={output} is out of range for a model with k={k} outputs")
    return output % k


class LinOperator(LinearOperator):
    """Base of the operators built on a :class:`~fntk.Linearized` ``self.lin``: its dtype and device;
    ``matmul`` refuses right-hand sides of the wrong size with a ValueError naming both shapes."""

    def matmul(self, other):
        if isinstance(other, Tensor):
            N = self.shape[-1]
            rows = other.shape[0] if other.dim() == 1 else other.shape[-2] if other.dim() >= 2 else None
            if rows != N:
                raise ValueError(
                    f"{type(self).__name__} of shape {tuple(self.shape)} multiplies a vector ({N},) or "
                    f"a matrix (..., {N}, r), got a tensor of shape {tuple(other.shape)}"
                )
        return super().matmul(other)

    @property
    def dtype(self) -> torch.dtype:
        return self.lin.dtype

    @property
    def device(self) -> torch.device:
        return self.lin.device


class SymmetricWeightOperator(LinOperator):
    """A symmetric (p × p) operator on the p selected parameters of ``self.lin`` (its own transpose)."""

    def _size(self) -> torch.Size:
        return torch.Size((self.lin.num_params, self.lin.num_params))

    def _transpose_nonbatch(self) -> SymmetricWeightOperator:
        return self



__all__ = ["as_columns", "from_columns", "check_output", "LinOperator", "SymmetricWeightOperator"]
