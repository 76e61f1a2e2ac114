"""Independent dense float64 references: explicit Jacobians by torch.autograd.functional.jacobian.

Nothing here uses fntk's own autodiff, so the library is checked against plain autograd.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def dense_jacobian(model: nn.Module, x: torch.Tensor | dict, names: list[str] | None = None) -> torch.Tensor:
    """J(x) as (n, k, p) for the named parameters (all trainable when None), in eval mode.

    x is a tensor (``model(x)``) or a dict of tensors (``model(**x)``); a dict output gives its
    ``"logits"``. Works on a deep copy so the caller's model is untouched.
    """
    m = copy.deepcopy(model).eval()
    params = dict(m.named_parameters())
    names = names if names is not None else [n for n, p in params.items() if p.requires_grad]
    base = {n: params[n].detach().clone() for n in names}
    others = {n: p.detach() for n, p in params.items() if n not in base}
    others.update({n: b for n, b in m.named_buffers()})

    def f(*flat):
        theta = dict(zip(names, flat))
        if isinstance(x, dict):
            out = torch.func.functional_call(m, {**others, **theta}, (), dict(x))
        else:
            out = torch.func.functional_call(m, {**others, **theta}, (x,))
        out = out["logits"] if isinstance(out, dict) else out
        return out.reshape(out.shape[0], -1)

    jac = torch.autograd.functional.jacobian(f, tuple(base[n] for n in names))
    n, k = f(*base.values()).shape
    return torch.cat([j.reshape(n, k, -1) for j in jac], dim=-1)


def eval_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = m(x)
    return out.reshape(out.shape[0], -1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / max(‖b‖, tiny)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fingerprint(model: nn.Module) -> dict:
    """Everything of a module that fntk must never change."""
    fp = {}
    for name, p in model.named_parameters():
        fp["p:" + name] = (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
    for name, b in model.named_buffers():
        fp["b:" + name] = b.detach().clone()
    for name, m in model.named_modules():
        fp["m:" + name] = (
            m.training,
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(getattr(m, "_full_backward_hooks", {}) or {}),
            len(getattr(m, "_full_backward_pre_hooks", {}) or {}),
        )
    return fp


def assert_same_fingerprint(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        if key.startswith("p:"):
            assert torch.equal(va[0], vb[0]) and va[1] == vb[1], key
            assert (va[2] is None) == (vb[2] is None), key
            if va[2] is not None:
                assert torch.equal(va[2], vb[2]), key
        elif key.startswith("b:"):
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key
