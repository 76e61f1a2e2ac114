"""CONTRACTION: the NTK from explicit per-example Jacobians, in chunks of points.

K[i,c,j,d] = Σ_p J[i,c,p] J[j,d,p]. Per-example Jacobians J(x_s) (b, k', p) come from the engine
(:meth:`fntk.Linearized.per_example_jacobian`: k' backward passes, batched); blocks of
them are contracted by one matrix product each. At most one row chunk of J(x1) and one column
chunk of J(x2) (or all of J(x2) when it fits the budget) are held at a time.

Costs: about (n1 + n2) k' backward passes and 2 n1 n2 k'² p flops ("full"; k' fewer for
"independent"); memory (b1 + b2) k' p numbers plus the output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fntk.linearize import Linearized
from fntk.ntk.blocks import ACT_FACTOR, Outputs, gram, plan_blocks, run_blocks


def jacobian_bytes(lin: Linearized, kk: int, p: int) -> tuple[float, float]:
    """(kept, transient) bytes per point of a per-example Jacobian chunk with k' rows of p."""
    item = torch.finfo(lin.dtype).bits // 8
    act = lin.activation_numel
    return kk * p * item, (ACT_FACTOR * act * (1 + kk) + 2 * kk * p) * item


def contraction_ntk(
    lin: Linearized, x1: Tensor, x2: Tensor, sym: bool, spec: Outputs, budget: int
) -> Tensor:
    """The canonical kernel (see :mod:`fntk.ntk.common`) by chunked Jacobian contraction."""
    n1, n2 = x1.shape[0], x2.shape[0]
    blocks = plan(lin, n1, n2, sym, spec, budget)
    jac = lin.per_example_jacobian(None, spec.index, split=True)

    def feats1(s: slice) -> list[Tensor]:
        return jac(x1[s])

    def feats2(s: slice) -> list[Tensor]:
        return jac(x2[s])

    def gram_fn(F1: list[Tensor], F2: list[Tensor]) -> Tensor:
        """Σ over parameter tensors of their Jacobian blocks' Grams."""
        blk = gram(F1[0], F2[0], spec.mode)
        for a, b in zip(F1[1:], F2[1:]):
            blk += gram(a, b, spec.mode)
        return blk

    return run_blocks(
        spec.shape(n1, n2), spec.mode, n1, n2, sym, blocks, feats1, feats2, gram_fn, lin.dtype, lin.device
    )


def plan(lin: Linearized, n1: int, n2: int, sym: bool, spec: Outputs, budget: int):
    """Block plan of the contraction under ``budget`` bytes (raises NTKMemoryError if none fits)."""
    kk = spec.kk
    kept, work = jacobian_bytes(lin, kk, lin.num_params)
    work -= kept / 2  # no concatenated copy
    item = torch.finfo(lin.dtype).bits // 8
    pair = 2 * kk * kk * item if spec.mode == "full" else 2 * kk * item
    avail = budget - spec.nbytes(n1, n2, lin.dtype)
    return plan_blocks(n1, n2, sym, kept, work, pair, avail, "NTK by contraction", kk)
