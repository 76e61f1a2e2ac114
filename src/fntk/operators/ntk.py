r"""The empirical NTK K = J(x1) J(x2)ᵀ as a matrix-free LinearOperator: (n1·k × n2·k), or (n1 × n2)
for one output; ``@`` is one Jᵀ product over x2 then one J product over x1 for all r columns:
vmapped vjp and jvp, or, for networks of Linear layers, GEMMs on layer taps kept between products
(:mod:`fntk.linearize.tapped`), whichever the cost model prefers.

Rows are point-major: row i·k + c is output c of point i. Because it is a ``LinearOperator``,
linear_operator's CG solves, Lanczos, ``to_dense`` and GPyTorch's ExactGP machinery all work on it
without forming J.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from fntk.linearize import Linearized
from fntk.linearize.tapped import TappedJacobian, tapped_layers
from fntk.linearize.taps import analyze
from fntk.ntk import cache
from fntk.ntk.costs import cheapest, ntk_product_seconds, tapped_product_seconds
from fntk.ntk.methods import choose_method
from fntk.operators.base import LinOperator, as_columns, check_output, from_columns

#: A dense kernel is formed (and cached) when its estimated cost is below this many products:
#: an operator is rarely multiplied once (CG, Lanczos and predictions reuse it).
DENSE_REUSE = 4.0


class NTKOperator(LinOperator):
    r"""The empirical NTK K(x1, x2) = J(x1) J(x2)ᵀ as a matrix-free operator.

    Shapes: (n1·k × n2·k) with ``outputs="full"`` (row i·k + c = output c of point i), or
    (n1 × n2) with ``outputs=c`` (the kernel of output c alone: J_c(x1) J_c(x2)ᵀ).
    ``K @ V`` costs one batched vjp over x2 and one batched jvp over x1, for all r columns at once.
    When the dense kernel fits in half the memory budget and forming it (by the fastest
    :func:`fntk.ntk` method, e.g. structured per-layer Grams) is estimated to cost less than
    ``DENSE_REUSE`` such products, the first product forms it instead and caches it, so that later
    products (CG iterations, Lanczos, predictions) cost one (n1·k × n2·k) matmul.

    Args:
        lin: the :class:`~fntk.Linearized` model.
        x1: inputs (n1, ...).
        x2: inputs (n2, ...); ``None`` means x1 (then K is symmetric PSD).
        outputs: ``"full"`` or an output index.
        dense: ``None`` (default) chooses as above; ``True`` always forms the cached dense kernel;
            ``False`` always multiplies matrix-free.
    """

    def __init__(
        self,
        lin: Linearized,
        x1: Tensor,
        x2: Tensor | None = None,
        outputs: int | str = "full",
        dense: bool | None = None,
        _checked: bool = False,
        _cache: dict | None = None,
    ):
        if not isinstance(lin, Linearized):
            raise TypeError(f"lin must be a fntk.Linearized, got {type(lin).__name__}")
        if dense not in (None, True, False):
            raise ValueError(f"dense must be None, True or False, got {dense!r}")
        if not _checked:
            x1 = lin.check_input(x1, "x1")
            x2 = x1 if x2 is None else lin.check_input(x2, "x2")
            outputs = check_output(lin, outputs)
        elif x2 is None:
            x2 = x1
        # the dense-kernel cache is a dict shared with the copies linear_operator rebuilds from kwargs
        cache = {} if _cache is None else _cache
        super().__init__(lin=lin, x1=x1, x2=x2, outputs=outputs, dense=dense, _checked=True, _cache=cache)
        self.lin, self.x1, self.x2, self.outputs = lin, x1, x2, outputs
        self._k = lin.num_outputs if outputs == "full" else 1
        self._dense_choice = dense
        self._cache = cache

    @property
    def _dense(self) -> Tensor | None:
        return self._cache.get("K")

    def _want_dense(self, r: int) -> bool:
        """Whether to form the dense kernel for a product with r columns (see the class doc)."""
        if self._dense_choice is not None:
            return self._dense_choice
        lin, (M, N) = self.lin, self.shape
        if M * N * torch.finfo(self.dtype).bits // 8 > lin.memory_budget // 2:
            return False
        x2 = None if self.symmetric else self.x2
        _, est = choose_method(lin, self.x1, x2, self.outputs)
        product = ntk_product_seconds(analyze(lin, self.x1).flops, self.x1.shape[0], self.x2.shape[0], r,
                                      lin.slowdown("vjp"), lin.slowdown("jvp"))
        options = {"dense": min(est.values()), "matrix-free": DENSE_REUSE * product}
        return cheapest(options, "K @ V") == "dense"

    def dense_kernel(self) -> Tensor:
        """The kernel as a dense (n1·k' × n2·k') tensor, formed once by :func:`fntk.ntk` and cached."""
        if self._dense is None:
            x2 = None if self.symmetric else self.x2
            self._cache["K"] = cache.kernel(self.lin, self.x1, x2, outputs=self.outputs).reshape(self.shape)
        return self._dense

    @property
    def symmetric(self) -> bool:
        return self.x1 is self.x2

    def _size(self) -> torch.Size:
        return torch.Size((self.x1.shape[0] * self._k, self.x2.shape[0] * self._k))

    def _transpose_nonbatch(self) -> NTKOperator:
        if self.symmetric:
            return self
        cache = {} if self._dense is None else {"K": self._dense.T}
        return NTKOperator(self.lin, self.x2, self.x1, self.outputs, self._dense_choice, True, cache)

    def _cotangent(self, cols: Tensor) -> Tensor:
        """Columns (n2·k', r) → cotangents (n2, k, r), zero outside the selected output."""
        n2, k = self.x2.shape[0], self.lin.num_outputs
        if self.outputs == "full":
            return cols.reshape(n2, k, -1)
        U = cols.new_zeros(n2, k, cols.shape[1])
        U[:, self.outputs] = cols
        return U

    def _tapped(self, r: int) -> tuple[TappedJacobian, TappedJacobian] | None:
        """Tapped products (J(x1), J(x2)) when they apply and the cost model prefers them."""
        lin = self.lin
        if "tapped" not in self._cache:
            an = tapped_layers(lin, self.x1)
            if an is None:
                self._cache["tapped"] = None
            else:
                t1 = TappedJacobian(lin, self.x1, an)
                self._cache["tapped"] = (t1, t1 if self.symmetric else TappedJacobian(lin, self.x2, an))
        pair = self._cache["tapped"]
        if pair is None:
            return None
        F, k = analyze(lin, self.x1).flops, lin.num_outputs
        n1, n2 = self.x1.shape[0], self.x2.shape[0]
        t1, t2 = pair
        calls = self._cache["tapped_calls"] = self._cache.get("tapped_calls", 0) + 1
        shared = calls if t1.keeps() and t2.keeps() else 1
        tapped = tapped_product_seconds(F, n2, k, r, t2.column_flops, t2.cached(), 1, t2.tap_flops, shared)
        tapped += tapped_product_seconds(F, n1, k, r, t1.column_flops, t1.cached() or t1 is t2, 1,
                                         t1.tap_flops, shared)
        autodiff = ntk_product_seconds(F, n1, n2, r, lin.slowdown("vjp"), lin.slowdown("jvp"))
        return pair if cheapest({"tapped": tapped, "autodiff": autodiff}, "K @ V") == "tapped" else None

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vec = as_columns(rhs.to(self.dtype))
        if self._dense is not None or self._want_dense(cols.shape[1]):
            return from_columns(self.dense_kernel() @ cols, shape, vec)
        pair = self._tapped(cols.shape[1])
        if pair is not None:
            F = pair[0].jvp(pair[1].vjp(self._cotangent(cols)))
        else:
            W = self.lin.vjp_mat(self.x2, self._cotangent(cols))  # (p, r)
            F = self.lin.jvp_mat(self.x1, W)  # (n1, k, r)
        F = F.reshape(-1, F.shape[-1]) if self.outputs == "full" else F[:, self.outputs]
        return from_columns(F, shape, vec)

    def _jac_rows(self, x: Tensor) -> Tensor:
        """Rows of J for this operator's outputs: (n·k', p)."""
        if self.outputs == "full":
            return self.lin.jacobian_mat(x).reshape(-1, self.lin.num_params)
        return self.lin.jacobian_mat(x, self.outputs)

    def _diagonal(self) -> Tensor:
        """Exact diagonal ‖J_ic(x)‖² (x1 = x2): per-example gradient norms, chunked, no point loop."""
        if not self.symmetric:
            return super()._diagonal()
        if self._dense is not None:
            return self._dense.diagonal()
        n, k = self.x1.shape[0], self._k
        per = self.lin.rows_per_chunk(k, extra_per_row=2 * k * self.lin.num_params)
        parts = [self._jac_rows(self.x1[s]).square().sum(-1) for s in self.lin.chunks(n, per)]
        return torch.cat(parts)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        """Rows and columns are points when k' == 1: index the inputs, stay matrix-free."""
        if self._k != 1 or batch_indices:
            return super()._getitem(row_index, col_index, *batch_indices)
        x1, x2 = self.x1[row_index], self.x2[col_index]
        if self.symmetric and _same_index(row_index, col_index):
            x2 = None
        return NTKOperator(self.lin, x1, x2, self.outputs, self._dense_choice, _checked=True)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices) -> Tensor:
        """Selected entries K[row, col] from the Jacobian rows of just the points involved."""
        if batch_indices:
            return super()._get_indices(row_index, col_index, *batch_indices)
        shape = torch.broadcast_shapes(row_index.shape, col_index.shape)
        r, c = row_index.expand(shape).reshape(-1), col_index.expand(shape).reshape(-1)
        k = self._k
        ur, r_inv = torch.unique(r // k, return_inverse=True)
        uc, c_inv = torch.unique(c // k, return_inverse=True)
        Jr = self._jac_rows(self.x1[ur]).reshape(len(ur), k, -1)[r_inv, r % k]
        Jc = self._jac_rows(self.x2[uc]).reshape(len(uc), k, -1)[c_inv, c % k]
        return (Jr * Jc).sum(-1).reshape(shape)

    def to_dense(self) -> Tensor:
        return self.dense_kernel()


def _same_index(a, b) -> bool:
    if isinstance(a, slice) and isinstance(b, slice):
        return a == b
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return False


__all__ = ["NTKOperator", "DENSE_REUSE"]
