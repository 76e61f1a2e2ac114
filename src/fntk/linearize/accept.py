"""How the estimators take a model: a :class:`~fntk.Linearized` as it is, or an ``nn.Module`` to
linearize (with the selection, memory budget and output function given), refusing a mix."""

from __future__ import annotations

from torch import nn

from fntk.linearize.linearized import Linearized
from fntk.linearize.outputs import OutputFn
from fntk.linearize.selection import ParamSelection


def as_linearized(
    model: nn.Module | Linearized,
    params: ParamSelection = None,
    memory_budget: int | None = None,
    output_fn: OutputFn | None = None,
    name: str = "model",
) -> Linearized:
    """``model`` itself when it is a :class:`Linearized` (then ``params``, ``memory_budget`` and
    ``output_fn`` must be None: they are set on it), else ``Linearized(model, params, ...)``; the
    estimators' one way to take either."""
    if isinstance(model, Linearized):
        options = {"params": params, "memory_budget": memory_budget, "output_fn": output_fn}
        given = [k for k, v in options.items() if v is not None]
        if given:
            where = ", ".join(f"{k}=..." for k in given)
            raise ValueError(
                f"{', '.join(given)} must be None when {name} is already a fntk.Linearized; set "
                f"{'them' if len(given) > 1 else 'it'} there: fntk.Linearized(model, {where})"
            )
        return model
    if isinstance(model, nn.Module):
        return Linearized(model, params, memory_budget=memory_budget, output_fn=output_fn)
    raise TypeError(f"{name} must be a torch.nn.Module or fntk.Linearized, got {type(model).__name__}")


__all__ = ["as_linearized"]
