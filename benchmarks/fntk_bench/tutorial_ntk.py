"""The PyTorch "Neural Tangent Kernels" tutorial's two recipes, reimplemented as baselines.

https://pytorch.org/tutorials/intermediate/neural_tangent_kernels.html

- ``tutorial_contraction``: ``vmap(jacrev(fnet_single))`` per-example Jacobians of x1 and x2, then
  ``einsum('Naf,Mbf->NMab')`` per parameter tensor, stacked and summed.
- ``tutorial_ntk_vps``: for every pair of points (``vmap(vmap(get_ntk))``), a ``vjp`` at x1 against
  each unit output vector followed by a ``jvp`` at x2.

As in the tutorial, x1 = x2 is not exploited. Unlike the tutorial (which runs on a handful of
points) both are applied in blocks of points so that the per-example Jacobians of a block stay
under ``cap`` bytes; otherwise they are the recipes verbatim. ``output=c`` applies them to the
scalar network f_c. Results are (n1, n2, k', k') as in the tutorial.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap


def _fnet_single(model: nn.Module, output: int | None):
    def fnet_single(params, x):
        out = functional_call(model, params, (x.unsqueeze(0),)).squeeze(0).reshape(-1)
        return out if output is None else out[output : output + 1]

    return fnet_single


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


def tutorial_contraction(
    model: nn.Module, x1: Tensor, x2: Tensor, output: int | None = None, cap: int = 2 * 1024**3
) -> Tensor:
    """The tutorial's ``empirical_ntk_jacobian_contraction`` ('full'), in blocks of points."""
    model = model.eval()
    params = _params(model)
    fnet_single = _fnet_single(model, output)
    k = fnet_single(params, x1[0]).numel()
    p = sum(v.numel() for v in params.values())
    b = max(1, cap // (k * p * x1.element_size()))
    out = x1.new_empty(x1.shape[0], x2.shape[0], k, k) if x1.is_floating_point() else None

    def jac(x):
        j = vmap(jacrev(fnet_single), (None, 0))(params, x)
        return [t.flatten(2) for t in j.values()]

    for s1 in _blocks(x1.shape[0], b):
        jac1 = jac(x1[s1])
        for s2 in _blocks(x2.shape[0], b):
            jac2 = jac(x2[s2])
            result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)])
            out[s1, s2] = result.sum(0)
            del jac2, result
    return out


def tutorial_ntk_vps(
    model: nn.Module, x1: Tensor, x2: Tensor, output: int | None = None, cap: int = 2 * 1024**3
) -> Tensor:
    """The tutorial's ``empirical_ntk_ntk_vps`` ('full'), over blocks of point pairs."""
    model = model.eval()
    params = _params(model)
    func = _fnet_single(model, output)
    k = func(params, x1[0]).numel()
    p = sum(v.numel() for v in params.values())

    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)  # vec @ J(x1)
            _, jvps = jvp(func_x2, (params,), vjps)  # J(x2) @ vjps
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    pairs = max(1, cap // (3 * k * p * x1.element_size()))  # a vjp result per pair and unit vector
    b2 = min(x2.shape[0], pairs)
    b1 = max(1, pairs // b2)
    out = x1.new_empty(x1.shape[0], x2.shape[0], k, k)
    f = vmap(vmap(get_ntk, (None, 0)), (0, None))
    for s1 in _blocks(x1.shape[0], b1):
        for s2 in _blocks(x2.shape[0], b2):
            out[s1, s2] = f(x1[s1], x2[s2])
    return out
