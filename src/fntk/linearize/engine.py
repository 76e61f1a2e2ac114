r"""The autodiff engine: pure ``torch.func`` maps of a module's parameters, batched over columns.

Every Jacobian-type computation of fntk goes through these functions (via
:class:`~fntk.linearize.Linearized`): the forward f(x; θ), J(x)V by forward mode, J(x)ᵀU by
reverse mode, and per-example Jacobian rows. θ is a dict of the selected parameters (name →
tensor); ``fixed`` holds the other parameters and the buffers. Shapes: n points, k outputs, p
selected parameters (a ``names`` subset has p_sub), r columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

Params = dict[str, Tensor]


def model_function(module: nn.Module, fixed: Params, x: Tensor) -> Callable[[Params], Tensor]:
    """The pure map θ ↦ f(x; θ) as an (n, k) tensor (outputs flattened per point)."""

    def f(theta: Params) -> Tensor:
        out = functional_call(module, {**fixed, **theta}, (x,))
        if not isinstance(out, Tensor):
            raise TypeError(
                f"model output must be a Tensor, got {type(out).__name__}; wrap the model so that "
                "forward returns a single tensor"
            )
        return out.reshape(out.shape[0], -1)

    return f


def jvp_columns(f: Callable[[Params], Tensor], theta: Params, tangents: Params) -> Tensor:
    """J V for tangents (r leading on every entry) → (n, k, r): one forward, vmapped over columns."""

    def one(t: Params) -> Tensor:
        return jvp(f, (theta,), (t,))[1]

    return vmap(one)(tangents).permute(1, 2, 0)


def vjp_columns(f: Callable[[Params], Tensor], theta: Params, U: Tensor) -> Params:
    """Jᵀ U for U (n, k, r) → dict with r leading: one forward and one vjp closure, vmapped."""
    _, pull = vjp(f, theta)
    return vmap(lambda u: pull(u)[0])(U.permute(2, 0, 1))


def per_example_jacobian(
    module: nn.Module,
    fixed: Params,
    theta: Params,
    names: Sequence[str],
    k: int,
    output: int | None = None,
    split: bool = False,
) -> Callable[[Tensor], Tensor | list[Tensor]]:
    """x (b, ...) ↦ per-example Jacobian rows (b, k', p_sub) of the parameters ``names`` (a subset of
    ``theta``'s keys, in that order), for all k outputs or (k' = 1) for ``output``; with ``split`` a
    list of per-parameter blocks (b, k', p_i) instead (no concatenation).

    vmap over points of reverse-mode Jacobians of one-point batches: one batched forward and k'
    batched backward passes. Points must not interact (eval mode)."""
    names = list(names)
    chosen = set(names)
    rest = {n: t for n, t in theta.items() if n not in chosen}
    sub = {n: theta[n] for n in names}

    def f1(s: Params, xi: Tensor) -> Tensor:
        out = functional_call(module, {**fixed, **rest, **s}, (xi[None],)).reshape(-1)
        return out if output is None else out[output : output + 1]

    jac = vmap(jacrev(f1), in_dims=(None, 0))
    kk = 1 if output is not None else k

    def run(x: Tensor) -> Tensor | list[Tensor]:
        d = jac(sub, x)
        b = x.shape[0]
        parts = [d[n].reshape(b, kk, -1) for n in names]
        return parts if split else torch.cat(parts, dim=-1)

    return run


__all__ = ["Params", "model_function", "jvp_columns", "vjp_columns", "per_example_jacobian"]
