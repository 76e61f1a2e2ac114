r"""The engine's fallbacks: exact paths for models on which a fast ``torch.func`` transform fails
or gives wrong numbers (the probes, :mod:`.probes`, decide which one a model takes).

- :func:`double_vjp_columns`: J V without forward mode. Jᵀu is linear in u, so differentiating
  u ↦ (Jᵀu)·v in u gives J v (reverse-over-reverse, the "double-vjp trick"): one forward, one
  backward recorded for reverse mode, then the r tangents pulled through it, vmapped.
- :func:`cotangent_rows`: per-example Jacobian rows without nested vmap. For a chunk of b points,
  one forward and one vjp closure of the whole chunk; the b·k' one-hot cotangents e_(i,c) are
  pulled back in one vmap. Costs b·k' backward passes of the chunk (b times the work of nested
  vmap), so chunks hold at most :data:`BASIS_POINTS` points.
- ``loop_*``: plain ``torch.autograd`` (no vmap, no functorch): one backward per cotangent, per
  column or per row. The last resort, and the reference the probes trust.

Shapes as in :mod:`.engine`: n (or b) points, k outputs (k' selected), r columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vjp, vmap

Params = dict[str, Tensor]
PureF = Callable[[Params], Tensor]

#: points per chunk of :func:`cotangent_rows` (measured best around 4-8 on an LSTM and a PReLU MLP;
#: see benchmarks/RESULTS.md, "Capability probes and fallbacks")
BASIS_POINTS = 8


def _leaves(theta: Params) -> Params:
    return {n: t.detach().requires_grad_(True) for n, t in theta.items()}


def _grads(y: Tensor, leaves: Params, cot: Tensor | None = None, create: bool = False) -> Params:
    if not y.requires_grad:  # the output does not depend on these parameters
        return {n: torch.zeros_like(t) for n, t in leaves.items()}
    with torch.enable_grad():
        g = torch.autograd.grad(y, list(leaves.values()), cot, retain_graph=True, create_graph=create,
                                allow_unused=True)
    return {n: torch.zeros_like(t) if gi is None else gi for (n, t), gi in zip(leaves.items(), g)}


def _stack(cols: list[Params]) -> Params:
    return {n: torch.stack([c[n] for c in cols]) for n in cols[0]}


def double_vjp_columns(f: PureF, theta: Params, tangents: Params) -> Tensor:
    """J V (n, k, r) by reverse-over-reverse (tangents r-leading)."""
    y, pull = vjp(f, theta)
    _, pull2 = vjp(lambda u: pull(u)[0], torch.zeros_like(y))
    return vmap(lambda t: pull2(t)[0])(tangents).permute(1, 2, 0)


def loop_vjp(f: PureF, theta: Params, U: Tensor) -> Params:
    """Jᵀ U (dict, r leading) by plain autograd: one forward, r backward passes."""
    leaves = _leaves(theta)
    with torch.enable_grad():
        y = f(leaves)
    cols = [_grads(y, leaves, U[..., j]) for j in range(U.shape[2])]
    return _stack([{n: g.detach() for n, g in c.items()} for c in cols])


def cotangent_rows(batch_f: Callable[[Tensor], PureF], sub: Params, names: Sequence[str], x: Tensor,
                   kk: int, points: int = BASIS_POINTS) -> list[Tensor]:
    """Per-parameter row blocks [(b, k', p_i)] by one vmap over the one-hot cotangents of chunks of
    at most ``points`` points (``batch_f(xs)`` is θ_sub ↦ f(xs) with the k' outputs)."""
    blocks: list[list[Tensor]] = [[] for _ in names]
    for i in range(0, x.shape[0], points):
        xs = x[i : i + points]
        b = xs.shape[0]
        y, pull = vjp(batch_f(xs), sub)
        E = torch.eye(b * kk, dtype=y.dtype, device=y.device).reshape(b * kk, b, kk)
        d = vmap(lambda u, pull=pull: pull(u)[0])(E)
        for blk, n in zip(blocks, names):
            blk.append(d[n].reshape(b, kk, -1))
    return [torch.cat(blk) for blk in blocks]


def loop_rows(batch_f: Callable[[Tensor], PureF], sub: Params, names: Sequence[str], x: Tensor,
              kk: int, points: int = BASIS_POINTS) -> list[Tensor]:
    """Per-parameter row blocks [(b, k', p_i)] by plain autograd: one backward per (point, output),
    on chunks of at most ``points`` points."""
    blocks: list[list[Tensor]] = [[] for _ in names]
    for i in range(0, x.shape[0], points):
        xs = x[i : i + points]
        leaves = _leaves(sub)
        with torch.enable_grad():
            y = batch_f(xs)(leaves)
        rows = [_grads(y[j, c], leaves) for j in range(xs.shape[0]) for c in range(kk)]
        for blk, n in zip(blocks, names):
            blk.append(torch.stack([r[n].detach().reshape(-1) for r in rows]).reshape(xs.shape[0], kk, -1))
    return [torch.cat(blk) for blk in blocks]


def loop_grad_at(loss: Callable[[Params], Tensor], theta: Params, steps: Params) -> Params:
    """∇L(θ + s_j) per step (r leading), by plain autograd."""
    r = next(iter(steps.values())).shape[0]
    cols = []
    for j in range(r):
        leaves = _leaves({n: theta[n] + steps[n][j] for n in theta})
        with torch.enable_grad():
            val = loss(leaves)
        cols.append({n: g.detach() for n, g in _grads(val, leaves).items()})
    return _stack(cols)


def loop_hvp(loss: Callable[[Params], Tensor], theta: Params, tangents: Params) -> Params:
    """∇²L(θ) V (r leading) by plain autograd: one gradient with create_graph, r backward passes."""
    leaves = _leaves(theta)
    with torch.enable_grad():
        g = _grads(loss(leaves), leaves, create=True)
        r = next(iter(tangents.values())).shape[0]
        cols = []
        for j in range(r):
            dot = sum((g[n] * tangents[n][j]).sum() for n in g)
            if not dot.requires_grad:  # L is linear in θ: the Hessian is zero
                cols.append({n: torch.zeros_like(t) for n, t in theta.items()})
                continue
            cols.append({n: h.detach() for n, h in _grads(dot, leaves).items()})
    return _stack(cols)


__all__ = ["BASIS_POINTS", "double_vjp_columns", "loop_vjp", "cotangent_rows", "loop_rows",
           "loop_grad_at", "loop_hvp"]
