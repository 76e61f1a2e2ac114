"""The private copy of the user's model that fntk evaluates, and the model checks made when a
:class:`~fntk.Linearized` is built.

:func:`private_copy` deep-copies the model **without its hooks**: forward, forward-pre, backward
and state-dict hooks of every submodule are left out of the copy (they would run many times
inside autodiff transforms, on wrapped tensors, and their side effects are the user's). The one
exception are torch's own hook-based reparametrizations ``torch.nn.utils.weight_norm`` and
``torch.nn.utils.spectral_norm``: their pre-hooks compute ``weight`` from the registered
parameters (``weight_g``/``weight_v``, ``weight_orig``) and are part of the function, so they are
kept (the plain tensor ``weight`` they leave on the module, not a leaf, is copied detached). A
model whose output depends on a hook of your own must do that work in a module instead.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

#: hooks that are part of the function (torch's hook-based reparametrizations)
_KEPT_HOOKS = (WeightNorm, SpectralNorm)


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode, without grads or user hooks (see the module doc)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for attr, value in vars(m).items():
            if "hook" in attr and isinstance(value, dict):
                kept = [(key, copy.deepcopy(h)) for key, h in value.items() if isinstance(h, _KEPT_HOOKS)]
                memo[id(value)] = type(value)(kept)
            elif isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()  # e.g. weight_norm's computed weight
    module = copy.deepcopy(model, memo)
    module.eval()
    module.requires_grad_(False)
    for p in module.parameters():
        p.grad = None
    return module


def check_model(module: nn.Module) -> None:
    """Refuse what no autodiff path can handle correctly: NaN/Inf or complex parameters/buffers,
    BatchNorm without running statistics (points interact) and ``nn.Embedding(max_norm=...)`` (it
    renormalises its weight in place during forward)."""
    named = [("parameter", n, t) for n, t in module.named_parameters()]
    named += [("buffer", n, t) for n, t in module.named_buffers()]
    for kind, name, t in named:
        if t.is_complex():
            raise TypeError(
                f"the model's {kind} {name!r} is complex ({t.dtype}); fntk linearizes real-valued "
                "networks only: split real and imaginary parts into real parameters"
            )
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"the model's {kind} {name!r} contains NaN or Inf ({bad} of {t.numel()} entries); "
                "linearize a trained network with finite weights (check the training run or the "
                "checkpoint that was loaded)"
            )
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            not m.track_running_stats or m.running_mean is None or m.running_var is None
        ):
            raise ValueError(
                f"module {describe(module, name)} has no running statistics "
                "(track_running_stats=False): it normalises with the statistics of the batch even in "
                "eval mode, so the points of a batch interact and f(x)[i] depends on the other points; "
                "fntk needs per-point outputs: use running statistics (track_running_stats=True, "
                "estimated on the training data) or a per-point norm (LayerNorm, GroupNorm)"
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            raise ValueError(
                f"module {name or type(m).__name__!r} is an {type(m).__name__} with "
                f"max_norm={m.max_norm}: it renormalises its weight in place during every forward, "
                "so the network is not a function of its parameters; renormalise the weight once "
                "(torch.embedding_renorm_) and set max_norm=None before linearizing"
            )


def frozen_rows(module: nn.Module, names: list[str],
                shapes: list[torch.Size]) -> tuple[Tensor | None, str | None]:
    """(flat (p,) mask of the selected entries autograd treats as constants, or None; why forward
    mode must not be used at all, or None).

    ``nn.Embedding``/``nn.EmbeddingBag`` with ``padding_idx`` get no gradient in that row (torch's
    backward zeroes it) although the forward reads it; forward-mode AD would differentiate it. The
    Jacobian fntk uses follows autograd (zero columns there), so forward-mode tangents are
    projected onto the other entries. A padded embedding weight that another module also holds
    (tied weights) gets gradient in that row from the other use, which a projection would drop:
    such models take no forward mode. (A weight also used functionally, e.g. ``h @ emb.weight.T``,
    is caught by the probes' adjoint test, which multiplies unprojected vectors.)"""
    holders: dict[int, list[str]] = {}
    for mname, m in module.named_modules():
        for attr, prm in m._parameters.items():
            if prm is not None:
                holders.setdefault(id(prm), []).append(f"{mname}.{attr}" if mname else attr)
    padded = {id(m.weight): (n, m) for n, m in module.named_modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.padding_idx is not None}
    params = dict(module.named_parameters())
    parts, any_frozen, unsafe = [], False, None
    for name, shape in zip(names, shapes):
        mask = torch.zeros(shape, dtype=torch.bool, device=params[name].device)
        owner = padded.get(id(params[name]))
        if owner is not None and len(holders.get(id(params[name]), [])) > 1:
            unsafe = (f"the padded embedding weight {name!r} is shared with "
                      f"{[h for h in holders[id(params[name])] if not h.startswith(owner[0] + '.')]}: "
                      "forward mode would differentiate its padding row, autograd gives it the other "
                      "use's gradient only")
        elif owner is not None:
            mask[owner[1].padding_idx] = True
            any_frozen = True
        parts.append(mask.reshape(-1))
    return (torch.cat(parts) if any_frozen else None), unsafe


def uses_embedding(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in module.modules())


def describe(module: nn.Module, name: str) -> str:
    """'name' (Type) for messages; the top-level module is named by its type."""
    sub = module.get_submodule(name) if name else module
    return f"{name!r} ({type(sub).__name__})" if name else f"the top-level {type(sub).__name__}"


__all__ = ["private_copy", "check_model", "frozen_rows", "uses_embedding", "describe"]
