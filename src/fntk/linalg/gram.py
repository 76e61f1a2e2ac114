"""The symmetric Gram matrix AᵀA from the GEMMs of its lower block columns (torch has no syrk)."""

from __future__ import annotations

from torch import Tensor

#: narrowest block column of :func:`gram` (narrower GEMMs lose more speed than they save flops)
GRAM_BLOCK = 128


def gram(A: Tensor) -> Tensor:
    """AᵀA (n × n) for A (p, n), exactly symmetric: B = max(1, n // GRAM_BLOCK) block columns,
    block j from one GEMM with the rows below it, mirrored above, (B + 1)/(2B) of the 2pn² flops
    of ``A.T @ A``. Measured, p = 2,010, n = 500, float64, one thread: 9.8 ms in 3 blocks against
    13.8 ms for ``A.T @ A`` (the softmax capacitance matrix of :mod:`fntk.classify.kron`)."""
    n = A.shape[1]
    blocks = max(1, n // GRAM_BLOCK)
    if blocks == 1:
        C = A.T @ A
        return 0.5 * (C + C.T)
    width = -(-n // blocks)
    C = A.new_empty(n, n)
    for i in range(0, n, width):
        blk = A[:, i:].T @ A[:, i : i + width]  # rows i.., columns i..i+width
        w = blk.shape[1]
        blk[:w] = 0.5 * (blk[:w] + blk[:w].T)  # the diagonal block: a GEMM is not bitwise symmetric
        C[i:, i : i + width] = blk
        C[i : i + width, i:] = blk.T
    return C


__all__ = ["gram", "GRAM_BLOCK"]
