r"""The autodiff engine: pure ``torch.func`` maps of a module's parameters, batched over columns.

Every Jacobian-type computation of fntk goes through these functions (via
:class:`~fntk.linearize.Linearized`, which picks each function's ``mode`` from its probed
:class:`~fntk.linearize.probes.Capabilities`): the forward f(x; θ), J(x)V, J(x)ᵀU, per-example
Jacobian rows, and the second-order products of the GGN operator. θ is a dict of the selected
parameters (name → tensor); ``fixed`` holds the other parameters and the buffers. Shapes: n
points, k outputs, p selected parameters (a ``names`` subset has p_sub), r columns. The fast
paths live here; the fallbacks (reverse-over-reverse, cotangent-basis rows, plain-autograd loops)
in :mod:`.fallbacks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from fntk import inputs
from fntk.inputs import Inputs
from fntk.linearize import fallbacks
from fntk.linearize.outputs import OutputFn, apply_output

Params = dict[str, Tensor]
PureF = Callable[[Params], Tensor]

JVP_MODES = ("forward", "double_vjp", "rows")
VJP_MODES = ("vmap", "loop")
ROW_MODES = ("nested_vmap", "cotangent_vmap", "loop")
GGN_MODES = ("fused", "composed")
HVP_MODES = ("forward_over_reverse", "reverse_over_reverse", "loop")
GRAD_MODES = ("vmap", "loop")


# ---------------------------------------------------------------------------------- flat vectors
def unflatten(v: Tensor, names: Sequence[str], shapes: Sequence[torch.Size]) -> Params:
    """Split a flat (..., p) vector into a dict of per-parameter (..., *shape) views."""
    lead = v.shape[:-1]
    parts = torch.split(v, [s.numel() for s in shapes], dim=-1)
    return {n: t.reshape(*lead, *s) for n, t, s in zip(names, parts, shapes)}


def flatten(d: Params, names: Sequence[str], lead: int = 0) -> Tensor:
    """Inverse of :func:`unflatten`: a dict of (*lead, *shape) tensors to a flat (*lead, p)."""
    return torch.cat([d[n].reshape(*d[n].shape[:lead], -1) for n in names], dim=-1)


# ---------------------------------------------------------------------------------- f
def model_function(module: nn.Module, fixed: Params, x: Inputs, output_fn: OutputFn | None = None) -> PureF:
    """The pure map θ ↦ f(x; θ) as an (n, k) tensor (the selected output, flattened per point).
    x is a tensor (called as ``module(x)``) or a dict batch (``module(**x)``), see :mod:`fntk.inputs`."""
    args, kwargs = inputs.call_args(x)
    n = inputs.rows(x)

    def f(theta: Params) -> Tensor:
        out = apply_output(functional_call(module, {**fixed, **theta}, args, kwargs), output_fn)
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(
                f"the model's output has shape {tuple(out.shape)} for {n} input points; "
                "fntk needs the points on the leading axis of the output, (n, ...): return one row "
                "per point (or select such an output with output_fn)"
            )
        return out.reshape(out.shape[0], -1)

    return f


# ---------------------------------------------------------------------------------- J V, Jᵀ U
def jvp_columns(f: PureF, theta: Params, tangents: Params, mode: str = "forward") -> Tensor:
    """J V for tangents (r leading on every entry) → (n, k, r).

    ``"forward"``: one forward pass carrying the r tangents (forward mode, vmapped);
    ``"double_vjp"``: reverse-over-reverse, J V = ∂/∂u (Jᵀu)·V, for models without forward mode."""
    if mode == "double_vjp":
        return fallbacks.double_vjp_columns(f, theta, tangents)

    def one(t: Params) -> Tensor:
        return jvp(f, (theta,), (t,))[1]

    return vmap(one)(tangents).permute(1, 2, 0)


def vjp_columns(f: PureF, theta: Params, U: Tensor, mode: str = "vmap") -> Params:
    """Jᵀ U for U (n, k, r) → dict with r leading: one forward and one vjp closure, vmapped over
    the r cotangents (``"vmap"``) or pulled back one by one by plain autograd (``"loop"``)."""
    if mode == "loop":
        return fallbacks.loop_vjp(f, theta, U)
    _, pull = vjp(f, theta)
    return vmap(lambda u: pull(u)[0])(U.permute(2, 0, 1))


# ---------------------------------------------------------------------------------- rows
def per_example_jacobian(
    module: nn.Module,
    fixed: Params,
    theta: Params,
    names: Sequence[str],
    k: int,
    output: int | Sequence[int] | None = None,
    split: bool = False,
    mode: str = "nested_vmap",
    output_fn: OutputFn | None = None,
    basis_points: int = fallbacks.BASIS_POINTS,
) -> Callable[[Tensor], Tensor | list[Tensor]]:
    """x (b, ...) ↦ per-example Jacobian rows (b, k', p_sub) of the parameters ``names`` (a subset of
    ``theta``'s keys, in that order), for all k outputs or (k' = len) the ``output`` indices; with
    ``split`` a list of per-parameter blocks (b, k', p_i) instead (no concatenation).

    ``"nested_vmap"``: vmap over points of reverse-mode Jacobians of one-point batches (one batched
    forward, k' batched backward passes); ``"cotangent_vmap"`` and ``"loop"``: see
    :mod:`.fallbacks` (``basis_points``: points per chunk there). Points must not interact (the
    probes check it)."""
    names = list(names)
    chosen = set(names)
    rest = {n: t for n, t in theta.items() if n not in chosen}
    sub = {n: theta[n] for n in names}
    sel = None if output is None else [output] if isinstance(output, int) else list(output)
    kk = k if sel is None else len(sel)

    def pick(out: Tensor) -> Tensor:
        return out if sel is None else out[..., sel]

    if mode in ("cotangent_vmap", "loop"):
        rows = fallbacks.cotangent_rows if mode == "cotangent_vmap" else fallbacks.loop_rows

        def batch_f(xs: Inputs) -> PureF:
            f = model_function(module, {**fixed, **rest}, xs, output_fn)
            return lambda s: pick(f(s))

        def run_fb(x: Inputs) -> Tensor | list[Tensor]:
            parts = rows(batch_f, sub, names, x, kk, basis_points)
            return parts if split else torch.cat(parts, dim=-1)

        return run_fb

    def f1(s: Params, xi: Tensor | dict[str, Tensor]) -> Tensor:
        args, kwargs = inputs.call_args(inputs.point_batch(xi))  # one point as a batch of one
        out = apply_output(functional_call(module, {**fixed, **rest, **s}, args, kwargs), output_fn)
        return pick(out.reshape(1, -1))[0]

    jac = vmap(jacrev(f1), in_dims=(None, 0))  # over points: every tensor of a dict batch on axis 0

    def run(x: Inputs) -> Tensor | list[Tensor]:
        d = jac(sub, inputs.tree(x))
        b = x.shape[0]
        parts = [d[n].reshape(b, kk, -1) for n in names]
        return parts if split else torch.cat(parts, dim=-1)

    return run


# ---------------------------------------------------------------------------------- second order
def ggn_columns(f: PureF, theta: Params, tangents: Params, hop: Callable[[Tensor], Tensor]) -> Params:
    """Jᵀ H (J V) with one shared forward per column (``"fused"``): reverse mode (``vjp``) of the
    forward-mode product, so the forward that carries the tangent also records the primal (about
    5/3 of a gradient's work per column). ``hop`` maps (n, k, 1) → (n, k, 1) (the output-space
    curvature). → dict with r leading."""

    def column(t: Params) -> Params:
        _, pull, jv = vjp(lambda th: jvp(f, (th,), (t,)), theta, has_aux=True)
        return pull(hop(jv[..., None])[..., 0])[0]

    if next(iter(tangents.values())).shape[0] == 1:  # no vmap for a single column
        return {n: g[None] for n, g in column({n: t[0] for n, t in tangents.items()}).items()}
    return vmap(column)(tangents)


def grad_columns(loss: Callable[[Params], Tensor], theta: Params, steps: Params,
                 mode: str = "vmap") -> Params:
    """∇L(θ + s_j) for the r parameter steps s_j (r leading) → dict with r leading, vmapped over the
    steps (batched parameters) or (``"loop"``) one plain-autograd gradient per step."""
    if mode == "loop":
        return fallbacks.loop_grad_at(loss, theta, steps)
    g = grad(loss)
    return vmap(lambda s: g({n: theta[n] + s[n] for n in theta}))(steps)


def hvp_columns(loss: Callable[[Params], Tensor], theta: Params, tangents: Params,
                mode: str = "forward_over_reverse") -> Params:
    """∇²L(θ) V → dict with r leading: forward-over-reverse (jvp of grad), reverse-over-reverse (vjp
    of grad; the Hessian is symmetric) or plain-autograd double backward per column (``"loop"``)."""
    if mode == "loop":
        return fallbacks.loop_hvp(loss, theta, tangents)
    g = grad(loss)
    if mode == "reverse_over_reverse":
        _, pull = vjp(g, theta)
        return vmap(lambda t: pull(t)[0])(tangents)
    return vmap(lambda t: jvp(g, (theta,), (t,))[1])(tangents)


__all__ = [
    "Params", "PureF", "JVP_MODES", "VJP_MODES", "ROW_MODES", "GGN_MODES", "HVP_MODES", "GRAD_MODES",
    "unflatten", "flatten", "model_function", "jvp_columns", "vjp_columns", "per_example_jacobian",
    "ggn_columns", "grad_columns", "hvp_columns",
]
