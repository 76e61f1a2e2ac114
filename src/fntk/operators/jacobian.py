"""J(x) as a matrix-free (n·k × p) LinearOperator: ``@`` is J·v (one jvp), ``.mT @`` is Jᵀ·u (one vjp)."""

from __future__ import annotations

import torch
from torch import Tensor

from fntk.linearize import Linearized
from fntk.operators.base import LinOperator, as_columns, from_columns


class JacobianOperator(LinOperator):
    """J(x) as an (n·k × p) operator; ``transposed=True`` gives Jᵀ (p × n·k).

    Args:
        lin: the :class:`~fntk.Linearized` model.
        x: inputs (n, ...).
    """

    def __init__(self, lin: Linearized, x: Tensor, transposed: bool = False, _checked: bool = False):
        if not isinstance(lin, Linearized):
            raise TypeError(f"lin must be a fntk.Linearized, got {type(lin).__name__}")
        x = x if _checked else lin.check_input(x)
        # all keyword arguments: linear_operator rebuilds operators as cls(**kwargs) from these
        super().__init__(lin=lin, x=x, transposed=transposed, _checked=True)
        self.lin, self.x, self.transposed = lin, x, transposed
        self._nk = x.shape[0] * lin.num_outputs

    def _size(self) -> torch.Size:
        p = self.lin.num_params
        return torch.Size((p, self._nk) if self.transposed else (self._nk, p))

    def _transpose_nonbatch(self) -> JacobianOperator:
        return JacobianOperator(self.lin, self.x, transposed=not self.transposed, _checked=True)

    def _apply(self, cols: Tensor, transpose: bool) -> Tensor:
        lin, n, k = self.lin, self.x.shape[0], self.lin.num_outputs
        if transpose:  # Jᵀ U: (n·k, r) → (p, r)
            return lin.vjp_mat(self.x, cols.reshape(n, k, -1))
        return lin.jvp_mat(self.x, cols).reshape(n * k, -1)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vec = as_columns(rhs.to(self.dtype))
        return from_columns(self._apply(cols, self.transposed), shape, vec)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vec = as_columns(rhs.to(self.dtype))
        return from_columns(self._apply(cols, not self.transposed), shape, vec)

    def to_dense(self) -> Tensor:
        J = self.lin.jacobian_mat(self.x).reshape(self._nk, -1)
        return J.T if self.transposed else J


__all__ = ["JacobianOperator"]
