"""A reimplementation of the original paper code's kernel-vector product (amzn/xfer finite_ntk).

Used only as the baseline in benchmarks (never in src/). For each column v of V it runs a fresh
forward pass, one backward for Jᵀv and the double-backward trick for J z:

    g(u) = Jᵀu = ∂(uᵀ f)/∂θ with a dummy u that requires grad (create_graph=True),
    J z = ∂(g(u)ᵀ z)/∂u,

i.e. a Python loop over columns with ~3 passes each.
"""

from __future__ import annotations

import torch
from torch import nn


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def paper_jvp(model: nn.Module, x: torch.Tensor, z: list[torch.Tensor]) -> torch.Tensor:
    """J(x) z by the double-backward trick (one fresh forward)."""
    params = _params(model)
    out = model(x)
    u = torch.zeros_like(out, requires_grad=True)
    g = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True)
    return torch.autograd.grad(g, u, grad_outputs=z)[0]


def paper_vjp(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """J(x)ᵀ v by one fresh forward and one backward."""
    out = model(x)
    return list(torch.autograd.grad(out, _params(model), grad_outputs=v))


def paper_ntk_matmul(model: nn.Module, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """K V = J (Jᵀ V), column by column, as the original code did. V: (n, k, r) → (n, k, r)."""
    cols = []
    for i in range(V.shape[-1]):
        w = paper_vjp(model, x, V[..., i])
        cols.append(paper_jvp(model, x, w))
    return torch.stack(cols, dim=-1)
