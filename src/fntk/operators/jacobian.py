"""J(x) as a matrix-free (n·k × p) LinearOperator: ``@`` is J·v (one jvp), ``.mT @`` is Jᵀ·u (one vjp);
for inputs given as a loader, batch by batch."""

from __future__ import annotations

import torch
from torch import Tensor

from fntk import inputs
from fntk.linearize import Linearized
from fntk.operators.base import LinOperator, as_columns, from_columns


class JacobianOperator(LinOperator):
    """J(x) as an (n·k × p) operator; ``transposed=True`` gives Jᵀ (p × n·k).

    Args:
        lin: the :class:`~fntk.Linearized` model.
        x: inputs (n, ...), a dict of tensors (n, ...) each, or a re-iterable of batches (a
            ``DataLoader``): then J V goes batch by batch (concatenated), Jᵀ U sums over the
            batches, and n is counted by one pass over the loader when the operator is built.
    """

    def __init__(self, lin: Linearized, x: Tensor, transposed: bool = False, _checked: bool = False,
                 _n: int | None = None):
        if not isinstance(lin, Linearized):
            raise TypeError(f"lin must be a fntk.Linearized, got {type(lin).__name__}")
        if not _checked:
            if inputs.is_loader(x):
                x = inputs.Stream(x, "x")
                _n = sum(inputs.rows(xb) for xb in lin.batches(x))
            else:
                x = lin.check_input(x)
        # all keyword arguments: linear_operator rebuilds operators as cls(**kwargs) from these
        super().__init__(lin=lin, x=x, transposed=transposed, _checked=True, _n=_n)
        self.lin, self.x, self.transposed = lin, x, transposed
        self._n = inputs.rows(x) if _n is None else _n
        self._nk = self._n * lin.num_outputs

    def _size(self) -> torch.Size:
        p = self.lin.num_params
        return torch.Size((p, self._nk) if self.transposed else (self._nk, p))

    def _transpose_nonbatch(self) -> JacobianOperator:
        return JacobianOperator(self.lin, self.x, transposed=not self.transposed, _checked=True, _n=self._n)

    def _apply(self, cols: Tensor, transpose: bool) -> Tensor:
        lin, n, k = self.lin, self._n, self.lin.num_outputs
        stream = isinstance(self.x, inputs.Stream)  # a loader: Linearized streams its batches
        if transpose:  # Jᵀ U: (n·k, r) → (p, r)
            U = cols.reshape(n, k, -1)
            return lin.vjp(self.x, U) if stream else lin.vjp_mat(self.x, U)
        return (lin.jvp(self.x, cols) if stream else lin.jvp_mat(self.x, cols)).reshape(n * k, -1)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vec = as_columns(rhs.to(self.dtype))
        return from_columns(self._apply(cols, self.transposed), shape, vec)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vec = as_columns(rhs.to(self.dtype))
        return from_columns(self._apply(cols, not self.transposed), shape, vec)

    def to_dense(self) -> Tensor:
        x = self.x
        J = self.lin.jacobian(x) if isinstance(x, inputs.Stream) else self.lin.jacobian_mat(x)
        J = J.reshape(self._nk, -1)
        return J.T if self.transposed else J


__all__ = ["JacobianOperator"]
