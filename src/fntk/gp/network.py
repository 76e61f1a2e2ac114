r"""What the composite NTK-GP reads from the network besides its NTK: the source variance output
and the per-layer kernel blocks.

- Source variance: a heteroscedastic net predicts, on an output v, a raw value r(x) whose link is
  its variance, σ²_src(x) = softplus(r) | exp(r) | r ("identity", which must be positive).
- Per-layer kernels: with the parameters grouped by the module that owns them (``"0.weight"`` and
  ``"0.bias"`` form layer ``"0"``), J = [J_1, …, J_L] and K = J Jᵀ = Σ_l J_l J_lᵀ. Each block is
  the NTK of a :class:`~fntk.Linearized` of the same network restricted to that layer's
  parameters (``fntk.ntk`` through the kernel cache, so the structured per-layer Grams are used
  where they apply).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fntk.gp.models import VARIANCE_LINKS
from fntk.linearize import Linearized
from fntk.ntk import cache

F64 = torch.float64
#: active diagonal caches (:func:`cached_diagonals`): key → (inputs kept alive, diagonal)
_DIAGONALS: list[dict] = []


def check_variance_output(index: int | None, k: int, needed_by: str) -> int:
    """The variance output's index in 0..k−1; ValueError naming it when the net has no such
    output or when none was given for a model that needs it."""
    if index is None:
        raise ValueError(
            f"{needed_by} needs the source network's variance output: pass variance_output=<index> "
            "(and variance_link) to NTKRegressor"
        )
    if not -k <= index < k:
        raise ValueError(
            f"variance_output={index}: the network has no output {index} (it has k={k} output(s)), so "
            "it cannot give the source variance σ²_src(x); use a heteroscedastic net (mean and variance "
            "outputs) or a model without '+hetero'/'@src'"
        )
    return index % k


def source_variance(out: Tensor, index: int, link: str) -> Tensor:
    """σ²_src (n,) float64 from the network outputs (n, k) by the link; ValueError if not positive."""
    r = out[:, index].to(F64)
    if link == "softplus":
        v = F.softplus(r)
    elif link == "exp":
        v = r.exp()
    elif link == "identity":
        v = r
    else:
        raise ValueError(f"variance_link must be one of {VARIANCE_LINKS}, got {link!r}")
    if not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
        raise ValueError(
            f"the source variance (output {index}, link {link!r}) is not finite and positive at every "
            f"point (min {float(v.min()):.3g}); check variance_output and variance_link"
        )
    return v


def layer_groups(lin: Linearized) -> list[list[str]]:
    """The selected parameter names grouped by owning module, in order."""
    groups: dict[str, list[str]] = {}
    for name in lin.names:
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    return list(groups.values())


def layer_linearizations(lin: Linearized) -> list[Linearized]:
    """One :class:`~fntk.Linearized` per layer of ``lin`` (same network, output selection and
    memory budget; the other parameters fixed at θ̂)."""
    return [
        Linearized(lin.module, params=g, memory_budget=lin.memory_budget, output_fn=lin.output_fn)
        for g in layer_groups(lin)
    ]


def layer_kernels(lins: Sequence[Linearized], x1: Tensor, x2: Tensor | None, output: int,
                  method: str) -> Tensor:
    """The per-layer kernels J_l(x1)J_l(x2)ᵀ of one output: (L, n1, n2) float64 (inputs checked by
    each layer's Linearized: its first call with data runs its probes)."""
    out = []
    for li in lins:
        a, b = li.check_input(x1, "x"), None if x2 is None else li.check_input(x2, "x")
        out.append(cache.output_kernels(li, a, b, [output], method)[0].to(F64))
    return torch.stack(out)


@contextlib.contextmanager
def cached_diagonals() -> Iterator[None]:
    """Within the block, the kernel diagonal diag J_c(x)J_c(x)ᵀ of a (Linearized, input tensor,
    outputs) is computed once (:func:`kernel_diagonal`): for predicting several fitted regressors at
    the same test points (the model choice's candidates; the cross kernels are
    :func:`fntk.ntk.cached_kernels`'). Keyed by object identity; the entries keep their inputs alive
    until the block ends, and inputs must not be modified in place inside it."""
    _DIAGONALS.append({})
    try:
        yield
    finally:
        _DIAGONALS.pop()


def kernel_diagonal(lin: Linearized, x: Tensor, outputs: Sequence[int]) -> Tensor:
    """:func:`fntk.ntk.cache.kernel_diagonal` (len(outputs), n), from an active
    :func:`cached_diagonals` block when it holds it."""
    if not _DIAGONALS:
        return cache.kernel_diagonal(lin, x, outputs)
    memo, key = _DIAGONALS[-1], (id(lin), id(x), tuple(outputs))
    if key not in memo:
        memo[key] = (lin, x, cache.kernel_diagonal(lin, x, outputs))
    return memo[key][2]


def layer_diagonals(lins: Sequence[Linearized], x: Tensor, output: int) -> Tensor:
    """diag J_l(x)J_l(x)ᵀ per layer: (L, m) float64."""
    return torch.stack([kernel_diagonal(li, li.check_input(x, "x"), [output])[0].to(F64) for li in lins])


__all__ = ["check_variance_output", "source_variance", "cached_diagonals", "kernel_diagonal", "layer_groups",
           "layer_linearizations", "layer_kernels", "layer_diagonals"]
