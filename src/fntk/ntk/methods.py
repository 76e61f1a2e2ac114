"""``fntk.ntk``: the empirical NTK k(x, x') = J(x) J(x')ᵀ, its methods and the "auto" planner.

The planner estimates each method's time from fntk's cost model (:mod:`fntk.ntk.costs`) over n1,
n2, k', p and the layer shapes under the memory budget, and picks the cheapest method whose
smallest working set fits. Every method runs on the autodiff paths the ``Linearized``'s probes
validated (``lin.capabilities``); their passes are priced by ``lin.slowdown`` (1 for the fast
paths, more for fallbacks such as per-example rows from cotangent vmaps), so e.g. a model
without forward mode prices the products method's J V by reverse-over-reverse.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from fntk import distributed
from fntk.errors import NTKMemoryError
from fntk.linearize import Linearized
from fntk.ntk import contraction, products, structured
from fntk.ntk.blocks import Outputs, gib, pairs
from fntk.ntk.costs import ELEM, R_AD, R_GEMM, cheapest


class NTKMethod(str, Enum):
    """How :func:`ntk` computes the kernel (all are exact)."""

    STRUCTURED = "structured"  # per-layer Grams of activations and output-gradients; J never formed
    CONTRACTION = "contraction"  # chunked per-example Jacobians, contracted
    PRODUCTS = "products"  # NTK-vector products J(x1)(J(x2)ᵀ E) over blocks of unit vectors E
    AUTO = "auto"  # the cheapest of the above by a cost and memory model


def estimate(
    lin: Linearized, x1: Tensor, x2: Tensor, sym: bool, spec: Outputs, budget: int
) -> dict[NTKMethod, float]:
    """Estimated seconds of each method on checked inputs (``inf`` where it cannot fit ``budget``)."""
    an = structured.analyze(lin, x1)
    n1, n2, kk, p = x1.shape[0], x2.shape[0], spec.kk, lin.num_params
    kp = kk * kk if spec.mode == "full" else kk
    ad = 2 * an.flops * (1 + 2 * kk) * lin.slowdown("rows")  # one forward, k' backward passes per point
    taps = max(lin.slowdown("vjp") if an.layers else 1.0, lin.slowdown("rows") if an.fallback else 1.0)
    est = {}
    try:
        pl = structured.plan(lin, an, n1, n2, sym, spec, budget)
        est[NTKMethod.STRUCTURED] = (pl.gemm / R_GEMM + taps * pl.ad / R_AD) * (1.0 if an.layers else 1.05)
    except NTKMemoryError:
        est[NTKMethod.STRUCTURED] = math.inf
    try:
        bl = contraction.plan(lin, n1, n2, sym, spec, budget)
        npairs = pairs(n1, n2, sym, bl.b1)
        passes = (n1 if sym else n1 + n2) + (0 if bl.cache2 else n2 * (math.ceil(n1 / bl.b1) - 1))
        form = passes * 2 * ELEM * kk * p
        est[NTKMethod.CONTRACTION] = (2 * npairs * kp * p + form) / R_GEMM + passes * ad / R_AD
    except NTKMemoryError:
        est[NTKMethod.CONTRACTION] = math.inf
    try:
        products.plan(lin, n1, n2, spec, budget)
        form = n2 * 2 * ELEM * kk * p
        est[NTKMethod.PRODUCTS] = products.cost(lin, an.flops, n1, n2, sym, spec) / R_AD + form / R_GEMM
    except NTKMemoryError:
        est[NTKMethod.PRODUCTS] = math.inf
    return est


def _method(method: NTKMethod | str) -> NTKMethod:
    try:
        return NTKMethod(method.lower() if isinstance(method, str) else method)
    except ValueError:
        names = ", ".join(repr(m.value) for m in NTKMethod)
        raise ValueError(f"method must be one of {names} (or an fntk.NTKMethod), got {method!r}") from None


def _budget(lin: Linearized, memory_budget: int | None) -> int:
    if memory_budget is None:
        return lin.memory_budget
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive int of bytes, got {memory_budget!r}")
    return memory_budget


def prepare(
    lin: Linearized, x1: Tensor, x2: Tensor | None, outputs: int | str, memory_budget: int | None
) -> tuple[Tensor, Tensor, bool, Outputs, int]:
    """Checked (x1, x2, sym, spec, budget); raises before anything large is allocated."""
    if not isinstance(lin, Linearized):
        raise TypeError(f"lin must be a fntk.Linearized, got {type(lin).__name__}")
    sym = x2 is None or x2 is x1
    x1 = lin.check_input(x1, "x1")
    x2 = x1 if sym else lin.check_input(x2, "x2")
    spec = Outputs.parse(outputs, lin.num_outputs)
    budget = _budget(lin, memory_budget)
    need = spec.nbytes(x1.shape[0], x2.shape[0], lin.dtype)
    if need > budget:
        raise NTKMemoryError(
            f"the NTK of shape {spec.shape(x1.shape[0], x2.shape[0])} ({lin.dtype}) needs {gib(need)} "
            f"for the result alone, more than the memory budget of {gib(budget)}; compute it in blocks "
            "of points, ask for one output (outputs=c) or 'independent', or raise memory_budget "
            "(argument, Linearized(memory_budget=...) or fntk.set_memory_budget)"
        )
    return x1, x2, sym, spec, budget


def choose_method(
    lin: Linearized, x1: Tensor, x2: Tensor | None = None, outputs: int | str = "full",
    memory_budget: int | None = None,
) -> tuple[NTKMethod, dict[NTKMethod, float]]:
    """What ``method="auto"`` picks for these arguments, and the estimated seconds of each method."""
    return _choose(lin, *prepare(lin, x1, x2, outputs, memory_budget))


def _choose(
    lin: Linearized, x1: Tensor, x2: Tensor, sym: bool, spec: Outputs, budget: int
) -> tuple[NTKMethod, dict[NTKMethod, float]]:
    est = estimate(lin, x1, x2, sym, spec, budget)
    try:
        return cheapest(est, "the NTK"), est
    except NTKMemoryError:
        raise NTKMemoryError(
            f"no NTK method fits the memory budget of {gib(budget)} beside the "
            f"{spec.shape(len(x1), len(x2))} result; raise memory_budget (argument, "
            "Linearized(memory_budget=...) or fntk.set_memory_budget)"
        ) from None


_IMPL = {
    NTKMethod.STRUCTURED: structured.structured_ntk,
    NTKMethod.CONTRACTION: contraction.contraction_ntk,
    NTKMethod.PRODUCTS: products.products_ntk,
}


def ntk(
    lin: Linearized,
    x1: Tensor,
    x2: Tensor | None = None,
    method: NTKMethod | str = "auto",
    outputs: int | str = "full",
    memory_budget: int | None = None,
) -> Tensor:
    """The empirical NTK K(x1, x2) = J(x1) J(x2)ᵀ of a linearized network, exactly.

    Args:
        lin: the :class:`~fntk.Linearized` network (k outputs, p selected parameters).
        x1: inputs (n1, ...); x2: inputs (n2, ...), or ``None`` for x2 = x1 (then the kernel is
            symmetric positive semi-definite and only half of it is computed).
        method: an :class:`NTKMethod` or its name: "structured", "contraction", "products" or
            "auto" (the cheapest by a cost and memory model; see :func:`choose_method`).
        outputs: "full": all output pairs, (n1, k, n2, k) with K[i,c,j,d] = J_c(x_i)·J_d(x_j);
            an int c: that output's kernel, (n1, n2); "independent": each output's kernel,
            (k, n1, n2). When k == 1 every mode gives (n1, n2).
        memory_budget: bytes of working memory, the result included (default: ``lin``'s budget,
            i.e. ``Linearized(memory_budget=...)`` or the module-wide ``fntk.set_memory_budget``
            setting, 2 GiB unless changed). Work is done in blocks of points that fit it.

    Returns:
        The kernel, in ``lin``'s dtype and device.

    Raises:
        NTKMemoryError (a MemoryError and a ValueError): the result alone, or the smallest block
        of the chosen method, does not fit the budget; the message states the estimate in GiB.
        Raised before anything large is allocated.
    """
    meth = _method(method)
    x1, x2, sym, spec, budget = prepare(lin, x1, x2, outputs, memory_budget)
    if distributed.is_active():
        return spec.finalize(_sharded(lin, x1, x2, sym, spec, budget, meth))
    if meth is NTKMethod.AUTO:
        meth, _ = _choose(lin, x1, x2, sym, spec, budget)
    with torch.no_grad():
        K = _IMPL[meth](lin, x1, x2, sym, spec, budget)
    return spec.finalize(K)


def _sharded(lin: Linearized, x1: Tensor, x2: Tensor, sym: bool, spec: Outputs, budget: int,
             meth: NTKMethod) -> Tensor:
    """Under torch.distributed: each rank computes the kernel rows of its shard of x1 against all
    of x2 (rank-local work, no collectives inside), then the row blocks are all-gathered."""
    n1, s = x1.shape[0], distributed.shard(x1.shape[0])
    rows = x1[s] if s.stop > s.start else x1[:1]  # more ranks than points: an empty block
    with distributed.local(), torch.no_grad():
        m = _choose(lin, rows, x2, False, spec, budget)[0] if meth is NTKMethod.AUTO else meth
        K = _IMPL[m](lin, rows, x2, False, spec, budget)
    K = K if s.stop > s.start else K[:0] if spec.mode == "full" else K[:, :0]
    if spec.mode == "full":  # (n1, k', n2, k')
        K = distributed.gather_rows(K, n1)
    else:  # (k', n1, n2): gather along the point axis
        K = distributed.gather_rows(K.transpose(0, 1).contiguous(), n1).transpose(0, 1)
    if sym:  # computed as rows against all of x2: restore exact symmetry
        K = 0.5 * (K + (K.permute(2, 3, 0, 1) if spec.mode == "full" else K.transpose(1, 2)))
    return K
