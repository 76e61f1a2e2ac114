"""PRODUCTS: the NTK from batched NTK-vector products K E = J(x1) (J(x2)ᵀ E), E unit vectors.

For a block of b points of x2 and their k' outputs, E is the (n2·k', b·k') block of unit vectors
of those rows; J(x2)ᵀE is the block's per-example Jacobian rows (b·k' parameter vectors, from
a vmap over points of reverse-mode products), and J(x1)(J(x2)ᵀE) is one forward-mode pass over
x1 vmapped over the r = b·k' tangents: K[:, :, block, :]. J(x1) is never formed; only p·r
numbers and the forward-mode activations of a chunk of x1 are held.

Costs: n2 k' backward passes plus n1 · n2 k' forward-mode tangent passes (half of the latter
when x2 = x1: only blocks on and above the diagonal, mirrored). Best when p is huge and n small.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fntk.errors import NTKMemoryError
from fntk.linearize import Linearized
from fntk.ntk.blocks import ACT_FACTOR, Outputs, chunks, gib, symmetrize, write_block
from fntk.ntk.contraction import jacobian_bytes

R_MAX = 256  # tangents per forward-mode pass


def plan(lin: Linearized, n1: int, n2: int, spec: Outputs, budget: int) -> tuple[int, int]:
    """(b, rows): x2 points per column block, x1 points per forward-mode chunk, under ``budget``."""
    item = torch.finfo(lin.dtype).bits // 8
    kk, k, act = spec.kk, lin.num_outputs, lin.activation_numel
    avail = budget - spec.nbytes(n1, n2, lin.dtype)
    kept, work = jacobian_bytes(lin, kk, lin.num_params)
    b = max(1, min(n2, R_MAX // kk))
    while True:
        r = b * kk
        cols = b * (kept + work)
        per_row = (ACT_FACTOR * act * (1 + r) + 2 * k * r) * item
        rows = int((avail - cols) // per_row)
        if rows >= min(n1, 64) or b == 1:
            break
        b = max(1, b // 2)
    if rows < 1:
        raise NTKMemoryError(
            f"NTK by products: one column block and one point need about {gib(cols + per_row)} "
            f"beyond the output, but only {gib(max(avail, 0))} of the budget is left; raise "
            "memory_budget (argument, Linearized(memory_budget=...) or fntk.set_memory_budget)"
        )
    return b, min(rows, n1)


def products_ntk(
    lin: Linearized, x1: Tensor, x2: Tensor, sym: bool, spec: Outputs, budget: int
) -> Tensor:
    """The canonical kernel (see :mod:`fntk.ntk.common`) by NTK-vector products."""
    n1, n2, kk, p = x1.shape[0], x2.shape[0], spec.kk, lin.num_params
    b, rows = plan(lin, n1, n2, spec, budget)
    out = torch.empty(spec.shape(n1, n2), dtype=lin.dtype, device=lin.device)
    jac = lin.per_example_jacobian(None, spec.index)
    full = spec.mode == "full"

    def block(xs: Tensor, V: Tensor, nb: int) -> Tensor:
        """J(xs) V for V = J(x2[block])ᵀ (p, nb·k') → canonical block."""
        Fo = lin.jvp_block(xs, V).reshape(xs.shape[0], lin.num_outputs, nb, kk)
        if spec.index is not None:
            return Fo[:, spec.index : spec.index + 1]
        return Fo if full else Fo.diagonal(dim1=1, dim2=3).permute(2, 0, 1)

    def put(s1: slice, s2: slice, blk: Tensor, mirror: bool) -> None:
        write_block(out, blk, s1, s2, spec.mode, mirror)

    for s2 in chunks(n2, b):
        nb = s2.stop - s2.start
        V = jac(x2[s2]).reshape(nb * kk, p).T
        if sym:  # the diagonal block, then the rows above it, mirrored
            put(s2, s2, symmetrize(torch.cat([block(x1[s], V, nb) for s in chunks(s2.stop, rows, s2.start)],
                                             0 if full else 1), spec.mode), False)
            for s1 in chunks(s2.start, rows):
                put(s1, s2, block(x1[s1], V, nb), True)
        else:
            for s1 in chunks(n1, rows):
                put(s1, s2, block(x1[s1], V, nb), False)
        del V
    return out


def cost(lin: Linearized, flops: float, n1: int, n2: int, sym: bool, spec: Outputs) -> float:
    """Flops of the forward/backward passes (forward-mode: ~4 flops per multiply-add per tangent),
    priced by the validated paths' ``lin.slowdown``."""
    kk = spec.kk
    tangents = (n1 * (n1 + 1) / 2 if sym else n1 * n2) * kk
    return 2 * flops * (n2 * (1 + 2 * kk) * lin.slowdown("rows") + 2 * tangents * lin.slowdown("jvp"))
