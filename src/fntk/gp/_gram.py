"""The two Gram matrices of GP regression with the kernel k(x, x') = J_c(x) J_c(x')ᵀ.

- function space: G = J_c(X) J_c(X)ᵀ (n × n), dense (:func:`dense_kernel`) or matrix-free
  (:class:`fntk.NTKOperator`);
- weight space: A = J_c(X)ᵀ J_c(X) (p × p), dense (:func:`dense_weight_gram`) or matrix-free
  (:func:`weight_gram_operator`, products Jᵀ(J v)).

J_c is the Jacobian of output c (n × p). Kernels come from ``fntk.ntk`` (structured per-layer
Grams), JᵀJ products from ``fntk.curvature.GGNOperator`` where it computes exactly that (k = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fntk.curvature import GGNOperator
from fntk.likelihoods import Gaussian
from fntk.linearize import Linearized
from fntk.ntk import NTKMemoryError, choose_method, ntk
from fntk.operators import _as_columns, _from_columns, _SymmetricWeightOperator


def dense_kernel(
    lin: Linearized, x1: Tensor, x2: Tensor | None, outputs: Sequence[int], method: str = "auto"
) -> Tensor:
    """K_c(x1, x2) = J_c(x1) J_c(x2)ᵀ for every c in ``outputs``: (len(outputs), n1, n2).

    Inputs are already checked (``lin.check_input``); x2 = None means x1 (symmetric result).
    ``fntk.ntk`` (structured per-layer Grams where it can, else the cheapest exact method) with a
    memory budget of the result plus ``lin``'s working budget.
    """
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    result = len(outputs) * x1.shape[0] * n2 * torch.finfo(lin.dtype).bits // 8
    budget = lin.memory_budget + result
    if len(outputs) == 1:
        return ntk(lin, x1, x2, method=method, outputs=int(outputs[0]), memory_budget=budget)[None]
    K = ntk(lin, x1, x2, method=method, outputs="independent", memory_budget=budget)
    return K[list(outputs)] if list(outputs) != list(range(K.shape[0])) else K


def kernel_seconds(lin: Linearized, x1: Tensor, x2: Tensor | None, kk: int) -> float:
    """fntk.ntk's estimate of the seconds to form the kernel(s) of k' = kk outputs."""
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    budget = lin.memory_budget + kk * x1.shape[0] * n2 * torch.finfo(lin.dtype).bits // 8
    outputs = 0 if kk == 1 else "independent"
    try:
        _, est = choose_method(lin, x1, x2, outputs=outputs, memory_budget=budget)
    except NTKMemoryError:
        return float("inf")
    return min(est.values())


def _jac(lin: Linearized, x: Tensor, outputs: Sequence[int]) -> Tensor:
    """J_c(x) for c in outputs: (len(outputs), n, p) (one Jacobian pass for all outputs)."""
    if len(outputs) == 1:
        return lin.jacobian_mat(x, int(outputs[0]))[None]
    return lin.jacobian_mat(x)[:, list(outputs)].permute(1, 0, 2)


def _block_rows(lin: Linearized, kk: int) -> int:
    """Points per Jacobian block so that two blocks of (kk, rows, p) fit the memory budget."""
    per_row = 2 * kk * lin.num_params * torch.finfo(lin.dtype).bits // 8
    return max(1, lin.memory_budget // max(per_row, 1))


def kernel_diagonal(lin: Linearized, x: Tensor, outputs: Sequence[int], block: int = 512) -> Tensor:
    """k_c(x_i, x_i) = ‖J_c(x_i)‖² for c in outputs: (len(outputs), n), from the diagonals of
    ``fntk.ntk`` kernels of blocks of ``block`` points (structured: J is never formed)."""
    parts = [
        dense_kernel(lin, x[s], None, outputs).diagonal(dim1=-2, dim2=-1)
        for s in lin._chunks(x.shape[0], block)
    ]
    return torch.cat(parts, dim=1)


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
    for s in lin._chunks(x.shape[0], _block_rows(lin, kk)):
        J = _jac(lin, x[s], outputs)  # (kk, b, p)
        A.baddbmm_(J.mT, J)
        B.baddbmm_(J.mT, rhs[:, s])
    return A.double(), B.double()


class _JtJOperator(_SymmetricWeightOperator):
    """A = J_c(X)ᵀ J_c(X) (p × p) by products A V = Jᵀ(J V): one batched jvp and one batched vjp.

    Hand-written (not GGNOperator) because it selects one output c of a k-output network; it is
    what ``GGNOperator(lin, x, Gaussian(), method="exact")`` computes when k = 1.
    """

    def __init__(self, lin: Linearized, x: Tensor, output: int):
        super().__init__(lin=lin, x=x, output=output)
        self.lin, self.x, self.output = lin, x, output

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vec = _as_columns(rhs.to(self.dtype))
        lin, n, k, c = self.lin, self.x.shape[0], self.lin.num_outputs, self.output
        JV = lin.jvp_mat(self.x, cols)[:, c]  # (n, r)
        U = JV.new_zeros(n, k, JV.shape[1])
        U[:, c] = JV
        return _from_columns(lin.vjp_mat(self.x, U), shape, vec)


def weight_gram_operator(lin: Linearized, x: Tensor, output: int) -> LinearOperator:
    """The matrix-free weight-space Gram J_c(X)ᵀ J_c(X) (p × p) as a LinearOperator: the exact
    Gauss-Newton operator of a unit-variance Gaussian likelihood for a one-output network, else
    the output-selecting Jᵀ(J v) operator."""
    if lin.num_outputs == 1:
        return GGNOperator(lin, x, Gaussian(1.0), method="exact")
    return _JtJOperator(lin, x, output)


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
    from fntk.operators import NTKOperator

    return NTKOperator(lin, x, outputs=output, _checked=True)
