r"""Model inputs batched along their first axis: a tensor x (n, ...) or a dict of tensors.

Every part of fntk that holds or splits inputs goes through the functions here, so that the rest
of the library handles both kinds the same way:

- a tensor x (n, *feature_shape), passed to the model as ``model(x)``;
- a :class:`Batch`, a dict of tensors that all have n rows on axis 0 (Hugging Face style:
  ``input_ids`` (n, L), ``attention_mask`` (n, L), ``pixel_values`` (n, 3, H, W), ...), passed to
  the model as keyword arguments, ``model(**batch)``; a ``"labels"`` entry holds targets and is
  never passed to the model.

Row operations (slicing, index selection, concatenation, per-point views for vmap) act on axis 0
of every tensor of a dict alike. Casting (:func:`cast`) moves every tensor to the model's device
and casts floating-point tensors to its dtype; integer and boolean tensors (token ids, masks) are
never converted to floats.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

#: the key of a dict that holds the targets (Hugging Face's convention): never a model input
LABELS = "labels"
#: Index: a slice, a 1-d integer/boolean tensor or a sequence of ints (rows to keep)
Index = slice | Tensor | Sequence[int]


def _describe_tensor(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


class Batch:
    """A dict of tensors batched along axis 0: n points, point i being ``{key: t[i]}``.

    The model receives it as keyword arguments: ``model(**batch.data)``. Built from any mapping of
    string keys to tensors of at least one dimension that all have the same number n of rows.

    Attributes:
        data: the dict ``{key: tensor (n, ...)}`` (insertion order kept).
        shape: ``torch.Size([n])``, the one axis the entries share (as a tensor's ``shape[0]``).
    """

    def __init__(self, data: Mapping[str, Tensor], name: str = "x"):
        if not isinstance(data, Mapping):
            raise TypeError(f"{name} must be a dict of tensors, got {type(data).__name__}")
        if not data:
            raise ValueError(f"{name} is an empty dict; pass the model's inputs as {{name: tensor (n, ...)}}")
        rows = None
        for key, t in data.items():
            if not isinstance(key, str):
                raise TypeError(f"{name} has a key {key!r} ({type(key).__name__}); the keys of a dict "
                                "input are the model's keyword arguments and must be strings")
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{key!r}] must be a torch.Tensor (n, ...), got {type(t).__name__}; "
                                "every entry of a dict input is a tensor batched along its first axis")
            if t.dim() == 0:
                raise ValueError(f"{name}[{key!r}] is a scalar; every entry of a dict input needs the "
                                 "batch axis first, (n, ...)")
            if rows is None:
                rows = (key, t.shape[0])
            elif t.shape[0] != rows[1]:
                raise ValueError(
                    f"{name}[{key!r}] has {t.shape[0]} rows but {name}[{rows[0]!r}] has {rows[1]}: every "
                    f"entry of a dict input is batched along axis 0 with the same n (got {describe(data)})"
                )
        self.data: dict[str, Tensor] = dict(data)

    def __len__(self) -> int:
        return next(iter(self.data.values())).shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self)])

    def keys(self):
        return self.data.keys()

    def items(self):
        return self.data.items()

    def values(self):
        return self.data.values()

    def __getitem__(self, index: Index) -> Batch:
        """The rows ``index`` of every entry (a slice, an index tensor or a list of ints)."""
        if isinstance(index, (int, str)) or (isinstance(index, Tensor) and index.dim() == 0):
            raise TypeError(
                f"a dict input is indexed by rows (a slice, an index tensor or a list of ints), got "
                f"{index!r}; for the tensor of a key use batch.data[key]"
            )
        return Batch({k: t[index] for k, t in self.data.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __repr__(self) -> str:
        return f"Batch(n={len(self)}, {describe(self)})"


#: what the library calls "inputs": a tensor (n, ...) or a dict of tensors (n, ...) each
Inputs = Tensor | Batch


def describe(x: Any) -> str:
    """A short description for messages: 'a tensor (4, 3) float64', "a dict {'ids': (4, 7) int64}"."""
    if isinstance(x, Tensor):
        return f"a tensor {_describe_tensor(x)}"
    if isinstance(x, (Batch, Mapping)):
        items = x.items()
        inner = ", ".join(f"{k!r}: " + (_describe_tensor(t) if isinstance(t, Tensor) else type(t).__name__)
                          for k, t in items)
        return f"a dict {{{inner}}}"
    return f"a {type(x).__name__}"


def as_inputs(x: Any, name: str = "x") -> Inputs:
    """x itself if it is a tensor or a :class:`Batch`; a mapping of tensors becomes a Batch without
    its ``"labels"`` entry (targets, never passed to the model); anything else is refused with a
    TypeError naming ``name``."""
    if isinstance(x, (Tensor, Batch)):
        return x
    if isinstance(x, Mapping):
        return Batch({k: v for k, v in x.items() if k != LABELS}, name)
    raise TypeError(
        f"{name} must be a torch.Tensor (n, ...), a dict of tensors batched along axis 0 (passed to the "
        f"model as model(**x)) or a re-iterable of such batches (a DataLoader), got {type(x).__name__}"
    )


def rows(x: Inputs) -> int:
    """n, the number of points."""
    return x.shape[0] if isinstance(x, Tensor) else len(x)


def cat(parts: Sequence[Inputs]) -> Inputs:
    """The points of ``parts`` one after another (all tensors, or all Batches with the same keys)."""
    if isinstance(parts[0], Tensor):
        return torch.cat(list(parts))
    keys = list(parts[0].keys())
    return Batch({k: torch.cat([p.data[k] for p in parts]) for k in keys})


def cast(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """One tensor on ``device``; floating point also cast to ``dtype``, integers and bools kept."""
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def map_tensors(x: Inputs, fn) -> Inputs:
    """``fn`` applied to x (a tensor) or to every entry of a Batch (another Batch)."""
    return fn(x) if isinstance(x, Tensor) else Batch({k: fn(t) for k, t in x.items()})


def repeat_first(x: Inputs, b: int) -> Inputs:
    """b copies of the first point (b, ...) as fresh tensors."""
    return map_tensors(x, lambda t: t[:1].expand(b, *t.shape[1:]).clone())


def tree(x: Inputs) -> Tensor | dict[str, Tensor]:
    """The pytree torch.func maps over: the tensor itself, or a Batch's plain dict."""
    return x if isinstance(x, Tensor) else x.data


def point_batch(xi: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
    """One point as a batch of one: xi (...) → (1, ...), for a tensor or every entry of a dict
    (as vmap over points hands them out)."""
    return xi[None] if isinstance(xi, Tensor) else {k: t[None] for k, t in xi.items()}


def call_args(x: Inputs | dict[str, Tensor]) -> tuple[tuple, dict[str, Tensor]]:
    """(args, kwargs) of the model call on x: ``((x,), {})`` for a tensor, ``((), dict)`` for a dict."""
    if isinstance(x, Tensor):
        return (x,), {}
    return (), dict(x.data if isinstance(x, Batch) else x)


def feature_shape(x: Inputs) -> tuple:
    """What must not change between calls: the trailing shape of a tensor; for a Batch the keys with
    their trailing shapes, ``(("input_ids", 7), ("attention_mask", 7))``."""
    if isinstance(x, Tensor):
        return tuple(x.shape[1:])
    return tuple((k, *t.shape[1:]) for k, t in x.items())


def signature(x: Inputs) -> tuple:
    """:func:`feature_shape` with the dtypes: batches of one loader must all have the same."""
    if isinstance(x, Tensor):
        return ("tensor", tuple(x.shape[1:]), x.dtype)
    return ("dict",) + tuple((k, tuple(t.shape[1:]), t.dtype) for k, t in x.items())


def row_keys(x: Inputs) -> list[bytes]:
    """One byte string per point identifying its content (every entry's row), for matching points."""
    ts = [x] if isinstance(x, Tensor) else list(x.values())
    flat = [t.detach().reshape(t.shape[0], -1).cpu().contiguous().numpy() for t in ts]
    return [b"".join(f[i].tobytes() for f in flat) for i in range(rows(x))]


__all__ = ["LABELS", "Inputs", "Index", "Batch", "describe", "as_inputs", "rows", "cat", "cast",
           "map_tensors", "repeat_first", "tree", "point_batch", "call_args", "feature_shape", "signature",
           "row_keys"]
