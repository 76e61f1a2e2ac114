"""Forming dense empirical NTKs once: the one entry point (:func:`kernel`) behind the operators, the
GP and the classifier, with two caches.

- :func:`cached_kernels`: within the block, a kernel asked for again with the same ``Linearized``
  and the same input tensors (by identity) is reused (e.g. a Laplace and a VI classifier sharing
  one ``Linearized`` and the same data).
- :func:`kernel_pool`: the kernel of a pool of inputs is computed once; within the block every
  kernel whose inputs are all rows of the pool (matched by content) is read from it.

Shapes: n1, n2 points, k outputs; ``outputs`` as in :func:`fntk.ntk` ("full": (n1, k, n2, k); an
int c: (n1, n2); "independent": (k, n1, n2)).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from fntk import inputs
from fntk.errors import NTKMemoryError
from fntk.inputs import Inputs
from fntk.linearize import Linearized
from fntk.ntk.methods import choose_method, ntk

F64 = torch.float64

_CACHE: dict | None = None
_POOLS: list[KernelPool] = []


class KernelPool:
    """The kernel of a pool of inputs (N, k, N, k) for one ``Linearized`` (see :func:`kernel_pool`),
    with counts of the kernels of that ``Linearized`` asked for in the block: ``served`` from the
    pool, ``computed`` because some input was not one of its rows."""

    def __init__(self, lin: Linearized, index: dict[bytes, int], K: Tensor):
        self.lin, self.index, self.K = lin, index, K
        self.served = 0
        self.computed = 0


@contextlib.contextmanager
def cached_kernels() -> Iterator[None]:
    """Within this block, kernels computed for the same ``Linearized`` and the same input tensors
    (by identity) are reused. The cache (which holds the kernels) is dropped on exit."""
    global _CACHE
    outer = _CACHE
    _CACHE = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            _CACHE = None


def _row_keys(x: Inputs) -> list[bytes]:
    return inputs.row_keys(x)


@contextlib.contextmanager
def kernel_pool(lin: Linearized, x: Tensor) -> Iterator[KernelPool]:
    """Compute the kernel K(x, x) of a pool of inputs (N, ...) once with :func:`fntk.ntk`; within
    the block every kernel of ``lin`` whose inputs are all rows of the pool (matched by content)
    is read from it instead of recomputed. For experiments that fit many models on subsets of one
    set of points (nested training sets, a fixed test set): the per-point work of the kernel
    (activations and per-example output gradients) is then done once per point.
    Memory: (N·k)² entries in the model's dtype. Yields the :class:`KernelPool`."""
    x = lin.check_input(x)
    k = lin.num_outputs
    K = ntk(lin, x, None, outputs="full").reshape(x.shape[0], k, x.shape[0], k)
    pool = KernelPool(lin, {key: i for i, key in enumerate(_row_keys(x))}, K)
    _POOLS.append(pool)
    try:
        yield pool
    finally:
        _POOLS.remove(pool)


def _from_pool(lin: Linearized, x1: Tensor, x2: Tensor | None, outputs: int | str) -> Tensor | None:
    pools = [pool for pool in reversed(_POOLS) if pool.lin is lin]
    for pool in pools:
        rows = []
        for x in (x1, x1 if x2 is None else x2):
            idx = [pool.index.get(key) for key in _row_keys(x)]
            if any(i is None for i in idx):
                break
            rows.append(torch.as_tensor(idx, device=pool.K.device))
        else:
            pool.served += 1
            K = pool.K
            sub = K[rows[0]][:, :, rows[1]]  # (n1, k, n2, k)
            if outputs == "full":
                return sub[:, 0, :, 0] if sub.shape[1] == 1 else sub
            if outputs == "independent":
                out = sub.diagonal(dim1=1, dim2=3).permute(2, 0, 1)
                return out[0] if out.shape[0] == 1 else out
            return sub[:, outputs, :, outputs]
    if pools:
        pools[0].computed += 1
    return None


def kernel(
    lin: Linearized,
    x1: Tensor,
    x2: Tensor | None = None,
    outputs: int | str = "full",
    method: str = "auto",
    memory_budget: int | None = None,
    cache: bool = True,
) -> Tensor:
    """:func:`fntk.ntk` (same arguments and result) on checked inputs, served from an active
    :func:`kernel_pool` or :func:`cached_kernels` block when it can be."""
    key = (id(lin), id(x1), None if x2 is None else id(x2), outputs, str(method))
    cache = cache and _CACHE is not None
    if cache and key in _CACHE:
        return _CACHE[key][2]
    K = _from_pool(lin, x1, x2, outputs) if _POOLS else None
    if K is None:
        K = ntk(lin, x1, x2, method=method, outputs=outputs, memory_budget=memory_budget)
    if cache:
        _CACHE[key] = (x1, x2, K)  # the inputs are kept alive so that their ids stay unique
    return K


# ------------------------------------------------------------------ single-output kernels (GP)
def _result_budget(lin: Linearized, kk: int, n1: int, n2: int) -> int:
    """The memory budget of a call: ``lin``'s working budget plus the result."""
    return lin.memory_budget + kk * n1 * n2 * torch.finfo(lin.dtype).bits // 8


def output_kernels(
    lin: Linearized, x1: Tensor, x2: Tensor | None, outputs: Sequence[int], method: str = "auto"
) -> Tensor:
    """K_c(x1, x2) = J_c(x1) J_c(x2)ᵀ for every c in ``outputs``: (len(outputs), n1, n2).

    Inputs are already checked (``lin.check_input``); x2 = None means x1 (symmetric result). The
    memory budget is the result plus ``lin``'s working budget.
    """
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    budget = _result_budget(lin, len(outputs), x1.shape[0], n2)
    if len(outputs) == 1:
        return kernel(lin, x1, x2, outputs=int(outputs[0]), method=method, memory_budget=budget)[None]
    K = kernel(lin, x1, x2, outputs="independent", method=method, memory_budget=budget)
    return K[list(outputs)] if list(outputs) != list(range(K.shape[0])) else K


def output_kernel_seconds(lin: Linearized, x1: Tensor, x2: Tensor | None, kk: int) -> float:
    """fntk.ntk's estimate of the seconds :func:`output_kernels` takes for k' = kk outputs."""
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    outputs = 0 if kk == 1 else "independent"
    try:
        _, est = choose_method(lin, x1, x2, outputs=outputs,
                               memory_budget=_result_budget(lin, kk, x1.shape[0], n2))
    except NTKMemoryError:
        return float("inf")
    return min(est.values())


def kernel_diagonal(lin: Linearized, x: Tensor, outputs: Sequence[int], block: int = 512) -> Tensor:
    """k_c(x_i, x_i) = ‖J_c(x_i)‖² for c in outputs: (len(outputs), n), from the diagonals of the
    kernels of blocks of ``block`` points (structured: J is never formed)."""
    parts = [
        output_kernels(lin, x[s], None, outputs).diagonal(dim1=-2, dim2=-1)
        for s in lin.chunks(x.shape[0], block)
    ]
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------ all-output kernels (classifier)
def kernel_matrix(lin: Linearized, x1: Tensor, x2: Tensor | None = None, cache: bool = True) -> Tensor:
    """J(x1) J(x2)ᵀ as a dense (n1·k × n2·k) float64 matrix (point-major rows) from checked
    inputs; exactly symmetric when x2 is None."""
    n1, n2, k = x1.shape[0], (x1 if x2 is None else x2).shape[0], lin.num_outputs
    K = kernel(lin, x1, x2, outputs="full", cache=cache).reshape(n1 * k, n2 * k).to(F64)
    return 0.5 * (K + K.T) if x2 is None else K


def diag_blocks(K: Tensor, c: int, k: int) -> Tensor:
    """The (k × k) diagonal blocks (c, k, k) of a point-major (c·k × c·k) kernel."""
    K4 = K.reshape(c, k, c, k)
    idx = torch.arange(c, device=K.device)
    return K4[idx, :, idx, :]


def kernel_diag_blocks(lin: Linearized, x: Tensor, chunk: int = 128) -> Tensor:
    """The per-point (k × k) blocks J(x_i) J(x_i)ᵀ: (n, k, k) float64."""
    k = lin.num_outputs
    return torch.cat(
        [
            diag_blocks(kernel_matrix(lin, x[s], None, cache=False), s.stop - s.start, k)
            for s in lin.chunks(x.shape[0], chunk)
        ]
    )


def test_kernels(lin: Linearized, x: Tensor, X: Tensor) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Chunks of test points s with K(x_s, X) (c·k × n·k) and the blocks K(x_i, x_i) (c, k, k).

    When it fits the memory budget, one kernel of the concatenation [x_s; X] gives both, so the
    (per-point) work of :func:`fntk.ntk` on X and x_s is done once per chunk rather than twice."""
    n, k, m = X.shape[0], lin.num_outputs, x.shape[0]
    budget = lin.memory_budget
    side = int(math.isqrt(max(budget // 24, 1)) // k)  # (c + n) k squared, in float64 and copies
    c = max(min(side - n, m), 0)
    joint = c >= min(64, m)
    for s in lin.chunks(m, c if joint else 256):
        key = ("test", id(lin), id(x), s.start, s.stop, id(X))
        if _CACHE is not None and key in _CACHE:
            yield s, *_CACHE[key][2]
            continue
        cs = s.stop - s.start
        if joint:
            K = kernel_matrix(lin, inputs.cat([x[s], X]), None, cache=False)
            out = K[: cs * k, cs * k :], diag_blocks(K[: cs * k, : cs * k], cs, k)
        else:
            out = kernel_matrix(lin, x[s], X, cache=False), kernel_diag_blocks(lin, x[s])
        if _CACHE is not None:
            _CACHE[key] = (x, X, out)
        yield s, *out


__all__ = [
    "KernelPool",
    "cached_kernels",
    "kernel_pool",
    "kernel",
    "output_kernels",
    "output_kernel_seconds",
    "kernel_diagonal",
    "kernel_matrix",
    "diag_blocks",
    "kernel_diag_blocks",
    "test_kernels",
]
