"""Operators and products of GP regression with the kernel k(x, x') = J_c(x) J_c(x')ᵀ of one output c.

- function space: G = J_c(X) J_c(X)ᵀ (n × n), matrix-free (:func:`ntk_operator`; the dense kernel
  is :func:`fntk.ntk.cache.output_kernels`);
- weight space: A = J_c(X)ᵀ J_c(X) (p × p), dense (:func:`dense_weight_gram`) or matrix-free
  (:func:`weight_gram_operator`, products Jᵀ(J v)).

J_c is the Jacobian of output c (n × p). JᵀJ products come from :class:`GGNOperator` where it
computes exactly that (k = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fntk.likelihoods import Gaussian
from fntk.linearize import Linearized
from fntk.operators.base import SymmetricWeightOperator, as_columns, from_columns
from fntk.operators.ggn import GGNOperator
from fntk.operators.ntk import NTKOperator


def output_jacobian(lin: Linearized, x: Tensor, outputs: Sequence[int]) -> Tensor:
    """J_c(x) for c in outputs: (len(outputs), n, p) (one Jacobian pass for all outputs)."""
    if len(outputs) == 1:
        return lin.jacobian_mat(x, int(outputs[0]))[None]
    return lin.jacobian_mat(x)[:, list(outputs)].permute(1, 0, 2)


def _block_rows(lin: Linearized, kk: int) -> int:
    """Points per Jacobian block so that two blocks of (kk, rows, p) fit the memory budget."""
    per_row = 2 * kk * lin.num_params * torch.finfo(lin.dtype).bits // 8
    return max(1, lin.memory_budget // max(per_row, 1))


def dense_weight_gram(
    lin: Linearized, x: Tensor, outputs: Sequence[int], rhs: Tensor
) -> tuple[Tensor, Tensor]:
    """A_c = J_c(X)ᵀ J_c(X) (len(outputs), p, p) and J_c(X)ᵀ rhs_c (len(outputs), p, r).

    rhs: (len(outputs), n, r). Accumulated over row blocks of the Jacobian, so only one block of
    J is ever held; the p × p products run in the model's dtype and are returned in float64.
    """
    kk, p = len(outputs), lin.num_params
    A = torch.zeros(kk, p, p, dtype=lin.dtype, device=lin.device)
    B = torch.zeros(kk, p, rhs.shape[-1], dtype=lin.dtype, device=lin.device)
    rhs = rhs.to(lin.dtype)
    for s in lin.chunks(x.shape[0], _block_rows(lin, kk)):
        J = output_jacobian(lin, x[s], outputs)  # (kk, b, p)
        A.baddbmm_(J.mT, J)
        B.baddbmm_(J.mT, rhs[:, s])
    return A.double(), B.double()


class JtJOperator(SymmetricWeightOperator):
    """A = J_c(X)ᵀ J_c(X) (p × p) by products A V = Jᵀ(J V): one batched jvp and one batched vjp.

    Hand-written (not GGNOperator) because it selects one output c of a k-output network; it is
    what ``GGNOperator(lin, x, Gaussian(), method="exact")`` computes when k = 1.
    """

    def __init__(self, lin: Linearized, x: Tensor, output: int):
        super().__init__(lin=lin, x=x, output=output)
        self.lin, self.x, self.output = lin, x, output

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vec = as_columns(rhs.to(self.dtype))
        lin, n, k, c = self.lin, self.x.shape[0], self.lin.num_outputs, self.output
        JV = lin.jvp_mat(self.x, cols)[:, c]  # (n, r)
        U = JV.new_zeros(n, k, JV.shape[1])
        U[:, c] = JV
        return from_columns(lin.vjp_mat(self.x, U), shape, vec)


def weight_gram_operator(lin: Linearized, x: Tensor, output: int) -> LinearOperator:
    """The matrix-free weight-space Gram J_c(X)ᵀ J_c(X) (p × p) as a LinearOperator: the exact
    Gauss-Newton operator of a unit-variance Gaussian likelihood for a one-output network, else
    the output-selecting Jᵀ(J v) operator."""
    if lin.num_outputs == 1:
        return GGNOperator(lin, x, Gaussian(1.0), method="exact")
    return JtJOperator(lin, x, output)


def jacobian_t(lin: Linearized, x: Tensor, output: int, U: Tensor) -> Tensor:
    """J_c(X)ᵀ U for U (n, r) → (p, r): one batched vjp (zero cotangent on the other outputs)."""
    n, k = x.shape[0], lin.num_outputs
    C = U.new_zeros(n, k, U.shape[1]).to(lin.dtype)
    C[:, output] = U.to(lin.dtype)
    return lin.vjp_mat(x, C)


def jacobian_v(lin: Linearized, x: Tensor, output: int, V: Tensor) -> Tensor:
    """J_c(X) V for V (p, r) → (n, r): one batched jvp."""
    return lin.jvp_mat(x, V.to(lin.dtype))[:, output]


def ntk_operator(lin: Linearized, x: Tensor, output: int) -> LinearOperator:
    """The matrix-free function-space kernel J_c(X) J_c(X)ᵀ (n × n)."""
    return NTKOperator(lin, x, outputs=output, _checked=True)


__all__ = [
    "output_jacobian",
    "dense_weight_gram",
    "JtJOperator",
    "weight_gram_operator",
    "jacobian_t",
    "jacobian_v",
    "ntk_operator",
]
