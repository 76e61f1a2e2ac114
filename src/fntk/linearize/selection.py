"""Which of a model's parameters :class:`~fntk.Linearized` linearizes: the :data:`ParamSelection`
spec and its resolution to names."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Union

from torch import Tensor, nn

#: ``None`` (all parameters with ``requires_grad``), an iterable of names from
#: ``model.named_parameters()``, or a predicate ``(name, param) -> bool``.
ParamSelection = Union[None, Iterable[str], Callable[[str, Tensor], bool]]  # noqa: UP007 (runtime alias)


def select(model: nn.Module, params: ParamSelection) -> list[str]:
    """Names of the selected parameters, in ``named_parameters()`` order (tied ones once)."""
    named = list(model.named_parameters())
    all_names = [n for n, _ in named]
    if params is None:
        names = [n for n, p in named if p.requires_grad]
    elif callable(params):
        names = [n for n, p in named if params(n, p)]
    else:
        if isinstance(params, str):
            raise TypeError(f"params must be an iterable of names, not a single string; got {params!r}")
        wanted = list(params)
        unknown = [n for n in wanted if n not in all_names]
        if unknown:
            raise ValueError(
                f"params: unknown parameter name(s) {unknown}; the model's parameters are {all_names}"
            )
        wanted_set = set(wanted)
        names = [n for n in all_names if n in wanted_set]
    if not names:
        raise ValueError(
            f"params: the selection is empty; choose at least one of the model's parameters {all_names}"
        )
    return names


__all__ = ["ParamSelection", "select"]
