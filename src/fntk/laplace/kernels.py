"""Empirical-NTK blocks for the classifier backends: cached kernels, kernel pools, test kernels."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from fntk.linearize import Linearized
from fntk.operators import NTKOperator

F64 = torch.float64

_CACHE: dict | None = None


@contextlib.contextmanager
def cached_kernels() -> Iterator[None]:
    """Within this block, kernels computed for the same ``Linearized`` and the same input tensors
    (by identity) are reused, e.g. between a Laplace and a VI classifier sharing one ``Linearized``
    and the same data. The cache (which holds the kernels) is dropped on exit."""
    global _CACHE
    outer = _CACHE
    _CACHE = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            _CACHE = None


_POOLS: list[tuple[Linearized, dict[bytes, int], Tensor]] = []


def _row_keys(x: Tensor) -> list[bytes]:
    rows = x.detach().reshape(x.shape[0], -1).cpu().contiguous().numpy()
    return [r.tobytes() for r in rows]


@contextlib.contextmanager
def kernel_pool(lin: Linearized, x: Tensor) -> Iterator[None]:
    """Compute the kernel K(x, x) of a pool of inputs (N, ...) once with :func:`fntk.ntk`; within
    the block every kernel of ``lin`` whose inputs are all rows of the pool (matched by content)
    is read from it instead of recomputed. For experiments that fit many classifiers on subsets
    of one set of points (nested training sets, a fixed test set): the per-point work of the
    kernel (activations and per-example output gradients) is then done once per point.
    Memory: (N·k)² entries in the model's dtype."""
    x = lin.check_input(x)
    K = _compute_ntk(lin, x, None)
    entry = (lin, {key: i for i, key in enumerate(_row_keys(x))}, K)
    _POOLS.append(entry)
    try:
        yield
    finally:
        _POOLS.remove(entry)


def _from_pool(lin: Linearized, x1: Tensor, x2: Tensor | None) -> Tensor | None:
    k = lin.num_outputs
    for plin, index, K in reversed(_POOLS):
        if plin is not lin:
            continue
        rows = []
        for x in (x1, x1 if x2 is None else x2):
            idx = [index.get(key) for key in _row_keys(x)]
            if any(i is None for i in idx):
                break
            t = torch.as_tensor(idx, device=K.device)
            rows.append((t[:, None] * k + torch.arange(k, device=K.device)).reshape(-1))
        else:
            return K[rows[0]][:, rows[1]].to(F64)
    return None


def _compute_ntk(lin: Linearized, x1: Tensor, x2: Tensor | None) -> Tensor:
    """(n1·k, n2·k) kernel in the model's dtype, by :func:`fntk.ntk` (explicit Jacobians if absent)."""
    try:
        from fntk.ntk import ntk
    except ImportError:  # fntk.ntk not available: explicit Jacobians
        ntk = None
    k = lin.num_outputs
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    if ntk is not None:
        K = ntk(lin, x1, x2, outputs="full")
    else:
        K = NTKOperator(lin, x1, x2, _checked=True).to_dense()
    return K.reshape(n1 * k, n2 * k)


def _ntk(lin: Linearized, x1: Tensor, x2: Tensor | None, cache: bool = True) -> Tensor:
    key = (id(lin), id(x1), None if x2 is None else id(x2))
    cache = cache and _CACHE is not None
    if cache and key in _CACHE:
        return _CACHE[key][2]
    K = _from_pool(lin, x1, x2) if _POOLS else None
    if K is None:
        K = _compute_ntk(lin, x1, x2).to(F64)
    if cache:
        _CACHE[key] = (x1, x2, K)  # the inputs are kept alive so that their ids stay unique
    return K


def kernel_matrix(lin: Linearized, x1: Tensor, x2: Tensor | None = None) -> Tensor:
    """The empirical NTK J(x1) J(x2)ᵀ as a dense (n1·k × n2·k) float64 matrix (point-major rows).

    Uses :func:`fntk.ntk` (structured per-layer Gram, no explicit J). Inputs must be checked by
    ``lin``. Symmetric when x2 is None.
    """
    K = _ntk(lin, x1, x2)
    return 0.5 * (K + K.T) if x2 is None else K


def _diag_blocks(K: Tensor, c: int, k: int) -> Tensor:
    K4 = K.reshape(c, k, c, k)
    idx = torch.arange(c, device=K.device)
    return K4[idx, :, idx, :]


def kernel_diag_blocks(lin: Linearized, x: Tensor, chunk: int = 128) -> Tensor:
    """The per-point (k × k) blocks J(x_i) J(x_i)ᵀ: (n, k, k) float64."""
    k = lin.num_outputs
    return torch.cat(
        [
            _diag_blocks(_ntk(lin, x[s], None, cache=False), s.stop - s.start, k)
            for s in lin._chunks(x.shape[0], chunk)
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
    for s in lin._chunks(m, c if joint else 256):
        key = ("test", id(lin), id(x), s.start, s.stop, id(X))
        if _CACHE is not None and key in _CACHE:
            yield s, *_CACHE[key][2]
            continue
        cs = s.stop - s.start
        if joint:
            K = _ntk(lin, torch.cat([x[s], X]), None, cache=False)
            out = K[: cs * k, cs * k :], _diag_blocks(K[: cs * k, : cs * k], cs, k)
        else:
            out = _ntk(lin, x[s], X, cache=False), kernel_diag_blocks(lin, x[s])
        if _CACHE is not None:
            _CACHE[key] = (x, X, out)
        yield s, *out


def prior_mean_function(lin: Linearized, x: Tensor, mu0: Tensor | None) -> Tensor:
    """m₀(x) = f(x; θ̂) + J(x)(μ₀ − θ̂): (n, k) float64 (μ₀ = None means μ₀ = θ̂)."""
    f = lin.forward(x).to(F64)
    if mu0 is None:
        return f
    d = (mu0 - lin.theta.to(F64)).to(lin.dtype)
    return f + lin.jvp_mat(x, d[:, None])[..., 0].to(F64)
