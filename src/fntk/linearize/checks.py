"""Argument checks of :class:`~fntk.Linearized` at the boundary: inputs x (n, ...) (a tensor or a
dict of tensors, see :mod:`fntk.inputs`), parameter-space vectors v (p,) | (p, r), function-space
cotangents u (n, k) | (n, k, r), and the probe batch."""

from __future__ import annotations

import torch
from torch import Tensor

from fntk import inputs
from fntk.inputs import Batch, Inputs


def check_x(x: object, name: str, dtype: torch.dtype, device: torch.device, int_inputs: bool) -> Tensor:
    """x as a tensor on the model's device (floats cast to its dtype); refuses scalars, empty
    batches, complex values, NaN/Inf, and integer inputs to a model without an Embedding."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a leading batch axis (n, ...), got a scalar")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: got shape {tuple(x.shape)}, expected at least one point")
    if x.is_complex():
        raise TypeError(
            f"{name} is complex ({x.dtype}); fntk linearizes real-valued networks: pass real inputs "
            "(e.g. torch.view_as_real(x) for real and imaginary parts as features)"
        )
    if x.is_floating_point():
        x = x.to(device=device, dtype=dtype)
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} contains NaN or Inf (first at index {i})")
        return x
    if x.dtype == torch.bool or not int_inputs:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the model is a {dtype} model without an "
            "Embedding layer; pass floating-point inputs"
        )
    return x.to(device)


def check_inputs(x: object, name: str, dtype: torch.dtype, device: torch.device, int_inputs: bool) -> Inputs:
    """x as checked inputs: a tensor by :func:`check_x`; a dict of tensors as a
    :class:`~fntk.inputs.Batch` with every entry checked (its name ``x['key']``) and moved to the
    device, floating-point entries cast to the model's dtype, integer and boolean entries (token ids,
    masks) passed through unchanged."""
    x = inputs.as_inputs(x, name)
    if isinstance(x, Tensor):
        return check_x(x, name, dtype, device, int_inputs)
    out = {}
    for key, t in x.items():
        where = f"{name}[{key!r}]"
        if t.shape[0] == 0:
            raise ValueError(f"{where} is empty: got shape {tuple(t.shape)}, expected at least one point")
        out[key] = t.to(device) if t.dtype == torch.bool else check_x(t, where, dtype, device, True)
    return Batch(out)


def check_vec(v: object, p: int, dtype: torch.dtype, device: torch.device,
              name: str = "v") -> tuple[Tensor, bool]:
    """v: (p,) or (p, r) → (p, r), and whether it was a single vector."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() not in (1, 2) or v.shape[0] != p:
        raise ValueError(
            f"{name} must have shape ({p},) or ({p}, r) for the {p} selected parameters, got {tuple(v.shape)}"
        )
    if not v.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {v.dtype}")
    v = v.to(device=device, dtype=dtype)
    return (v[:, None], True) if v.dim() == 1 else (v, False)


def check_cotangent(u: object, n: int, k: int, dtype: torch.dtype, device: torch.device,
                    name: str = "u") -> tuple[Tensor, bool]:
    """u: (n, k) | (n, k, r), or (n,) | (n, r) when k == 1 → (n, k, r), and single-vector flag."""
    if not isinstance(u, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {u.dtype}")
    u = u.to(device=device, dtype=dtype)
    if u.dim() >= 1 and u.shape[0] == n:
        if u.dim() == 2 and u.shape[1] == k:
            return u[..., None], True
        if u.dim() == 3 and u.shape[1] == k:
            return u, False
        if k == 1 and u.dim() == 1:
            return u[:, None, None], True
        if k == 1 and u.dim() == 2:
            return u[:, None, :], False
    raise ValueError(
        f"{name} must have shape ({n}, {k}) or ({n}, {k}, r) for n={n} points and k={k} outputs"
        + (f" (or ({n},) / ({n}, r) since k == 1)" if k == 1 else "")
        + f", got {tuple(u.shape)}"
    )


def check_outputs(out: Tensor, what: str) -> None:
    """Refuse outputs that cannot be linearized: integer, boolean or complex, or not finite."""
    if out.is_complex():
        raise ValueError(
            f"the model's output is complex ({out.dtype}) {what}; fntk linearizes real outputs: "
            "return torch.view_as_real(out) (real and imaginary parts as outputs) via output_fn"
        )
    if not out.is_floating_point():
        raise ValueError(
            f"the model's output has dtype {out.dtype} {what}; an integer or boolean output (e.g. an "
            "argmax or a class label) has no derivative: return the floating-point scores or logits "
            "(select them with output_fn)"
        )
    if out.numel() == 0:
        raise ValueError(f"the model's output is empty (shape {tuple(out.shape)}) {what}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"the model's output contains NaN or Inf {what}; check the weights and the inputs"
        )


def _perturbed(x0: Tensor) -> Tensor:
    """Another point near x0 (1, ...): floats with small Gaussian noise, integers rolled along the
    last axis (booleans kept)."""
    if x0.is_floating_point():
        g = torch.Generator(device=x0.device).manual_seed(0)
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype, device=x0.device)
        return x0 + 0.1 * (x0.abs().mean() + 1) * noise
    if x0.dtype == torch.bool:
        return x0
    return x0.reshape(1, -1).roll(1, -1).reshape(x0.shape)


def probe_batch(x: Inputs, points: int) -> Inputs:
    """The first ``points`` points of x, plus (when they are fewer than 2 distinct points) a
    perturbed copy of x[0] (floats: small Gaussian noise; integer tokens: rolled along the last
    axis; every entry of a dict batch alike), so that the probes can see whether points interact."""
    xb = x[:points]
    if len(set(inputs.row_keys(xb))) >= 2:
        return xb
    x0 = xb[:1]
    aug = inputs.map_tensors(x0, _perturbed)
    return x0 if inputs.row_keys(aug) == inputs.row_keys(x0) else inputs.cat([x0, aug])


__all__ = ["check_x", "check_inputs", "check_vec", "check_cotangent", "check_outputs", "probe_batch"]
