"""Output selection: which tensor of a model's output is the function f(x) that fntk linearizes.

``Linearized(model, output_fn=...)`` takes a callable mapping the model's raw output to a tensor of
shape (n, ...) (flattened to (n, k)); it runs inside autodiff transforms, so it must be a pure
torch function of the output (indexing, slicing, ``torch.cat``; no ``.item()``, no NumPy).
Without it (:func:`default_output`):

- a tensor is used as it is;
- a dict, or a Hugging Face-style ``ModelOutput`` (a dict subclass with attributes), gives its
  ``"logits"`` entry; other keys are refused with the list of keys;
- a tuple or list is refused: say which element with e.g. ``output_fn=lambda out: out[0]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

OutputFn = Callable[[Any], Tensor]


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"Tensor{tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {len(out)} ({', '.join(_describe(o) for o in out)})"
    return type(out).__name__


def default_output(out: Any) -> Tensor:
    """The default output selection (see the module doc)."""
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"model output must be a Tensor (or a dict / ModelOutput with a 'logits' tensor), got a "
        f"{_describe(out)}; pass output_fn= to Linearized to choose the output, e.g. "
        "output_fn=lambda out: out[0] for the first element of a tuple, or "
        "output_fn=lambda out: out['scores'] for a dict entry"
    )


def apply_output(out: Any, output_fn: OutputFn | None) -> Tensor:
    """output_fn(out) (or the default), checked to be a tensor with a leading batch axis."""
    if output_fn is None:
        return default_output(out)
    sel = output_fn(out)
    if not isinstance(sel, Tensor):
        raise TypeError(
            f"output_fn must return a Tensor of shape (n, ...), got a {_describe(sel)} from the "
            f"model output {_describe(out)}"
        )
    return sel


def check_output_fn(output_fn: object) -> OutputFn | None:
    if output_fn is not None and not callable(output_fn):
        raise TypeError(
            f"output_fn must be a callable mapping the model's output to a tensor (n, ...) or None, "
            f"got {type(output_fn).__name__}"
        )
    return output_fn  # type: ignore[return-value]


__all__ = ["OutputFn", "default_output", "apply_output", "check_output_fn"]
