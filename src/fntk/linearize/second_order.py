r"""Second-order products of a :class:`~fntk.Linearized` network for the GGN operator
(:class:`fntk.GGNOperator`), each on the path the probes validated for this model.

For checked x (b points), V (p, r), the output-space curvature ``hop`` (b, k, r) → (b, k, r) and a
scalar loss of the outputs ``loss_of_f`` (b, k) → (), with L(θ) = loss_of_f(f(x; θ)):

- :func:`ggn_product`: Jᵀ H (J V), fused (one forward per column, vjp of jvp) when forward mode
  and the fusion are validated, else J V and Jᵀ(·) by the validated products;
- :func:`gradients_at`: ∇L(θ̂ + s_j) for r parameter steps s_j (columns of S (p, r));
- :func:`hessian_product`: ∇²L(θ̂) V.

Forward-mode paths get their parameter-space inputs projected onto the entries autograd
differentiates (embedding padding rows are constants, as in every other product), and so do the
finite-difference steps.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from fntk.linearize import engine, probes

_NEEDS = {"hvp": "second derivatives of the network (a double backward pass)",
          "grad": "gradients at perturbed parameters"}


def path(lin, what: str) -> str:
    """The validated path for ``what`` ("ggn", "hvp", "grad"), probing it on the probe batch the
    first time; ValueError when no path exists (plain autograd itself fails)."""
    caps = lin.capabilities
    if getattr(caps, what) is None:
        xb = lin._probe_x
        with lin._session():
            probes.probe_second_order(lin._target(), xb, caps, what,
                                      lambda V: lin.jvp_block(xb, V), lambda U: lin.vjp_block(xb, U))
    mode = getattr(caps, what)
    padded = lin._keep is not None or lin._no_forward
    if what == "grad" and padded and caps.jvp != "forward":
        raise ValueError(
            "this model has embedding padding rows that autograd treats as constants, and forward "
            "mode could not confirm that leaving them out of a parameter step is exact "
            f"({caps.rejected.get('jvp:forward')}); GGNOperator(method='finite_difference') perturbs "
            "the parameters, so it would differentiate those rows: use method='exact'"
        )
    if mode == "unavailable":
        raise ValueError(
            f"this model has no autodiff path for {_NEEDS[what]}: plain torch.autograd fails with "
            f"{caps.rejected.get(what + ':loop')}; GGNOperator(method='autograd') needs it, "
            "method='exact' computes the same G from first derivatives (J and Jᵀ products)"
        )
    return mode


def ggn_product(lin, x: Tensor, V: Tensor, hop: Callable[[Tensor], Tensor]) -> Tensor:
    """Jᵀ hop(J V) (p, r) for checked x and V (p, r)."""
    if path(lin, "ggn") == "composed":
        return lin.vjp_block(x, hop(lin.jvp_block(x, V)))
    V = lin._project(V)  # the fused path differentiates forward mode
    with lin._session():
        cols = engine.ggn_columns(lin.function(x), lin.theta_dict(), lin.unflatten(V.T), hop)
    return lin.flatten(cols, lead=1).T


def gradients_at(lin, x: Tensor, loss_of_f: Callable[[Tensor], Tensor], S: Tensor) -> Tensor:
    """[∇L(θ̂ + s_j)]_j (p, r) for steps S (p, r)."""
    mode = path(lin, "grad")
    with lin._session():
        f = lin.function(x)
        cols = engine.grad_columns(lambda th: loss_of_f(f(th)), lin.theta_dict(),
                                   lin.unflatten(lin._project(S).T), mode)
    return lin.flatten(cols, lead=1).T


def hessian_product(lin, x: Tensor, loss_of_f: Callable[[Tensor], Tensor], V: Tensor) -> Tensor:
    """∇²L(θ̂) V (p, r)."""
    mode = path(lin, "hvp")
    V = lin._project(V) if mode == "forward_over_reverse" else V
    with lin._session():
        f = lin.function(x)
        cols = engine.hvp_columns(lambda th: loss_of_f(f(th)), lin.theta_dict(), lin.unflatten(V.T), mode)
    return lin.flatten(cols, lead=1).T


__all__ = ["path", "ggn_product", "gradients_at", "hessian_product"]
