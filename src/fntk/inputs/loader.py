r"""Data given as batches: a torch ``DataLoader`` or any re-iterable of batches, validated batch by batch.

A batch is one of

- a tensor x_b (b, ...) or a dict of tensors (b, ...) each (see :mod:`fntk.inputs.batch`);
- a tuple or list ``(x_b,)`` or ``(x_b, y_b)`` (what a ``DataLoader`` over a ``TensorDataset``
  yields): x_b as above, y_b the targets (b, ...);
- a dict with a ``"labels"`` entry (the Hugging Face convention): the labels are the targets and are
  never passed to the model.

Targets are used by fits and ignored by predictions and products. Every batch must have at least one
point, and the same kind, keys, trailing shapes and dtypes as batch 0 (the model sees one feature
shape); x_b and y_b must have the same number of rows. Whatever breaks these rules is refused with a
ValueError (TypeError for a wrong type) naming the batch index, what was expected and what came.

The data must be *re-iterable* (``iter(data)`` gives a fresh pass each time, as for a DataLoader or a
list): operators iterate it once per product. A one-shot iterator or generator is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from fntk.inputs.batch import LABELS, Batch, Inputs, as_inputs, cat, describe, rows, signature


def is_loader(x: Any) -> bool:
    """Whether x is given as batches: iterable, and not a tensor, a dict, a Batch or a string."""
    if isinstance(x, (Tensor, Mapping, Batch, str, bytes)):
        return False
    return hasattr(x, "__iter__")


def _split(batch: Any, i: int, name: str) -> tuple[Inputs, Tensor | None]:
    """(x_b, y_b or None) of one batch (see the module doc)."""
    where = f"batch {i} of {name}"
    if isinstance(batch, (tuple, list)):
        odd = next((item for item in batch if not isinstance(item, (Tensor, Mapping, Batch))), None)
        if odd is not None:
            raise TypeError(
                f"{name} must be a torch.Tensor (n, ...), a dict of tensors or a re-iterable of batches "
                f"of them; {where} is a {type(batch).__name__} holding a {type(odd).__name__} (Python "
                "numbers or lists?): convert the data with torch.tensor(...) or torch.stack(...)"
            )
        if len(batch) not in (1, 2):
            raise ValueError(
                f"{where} is a {type(batch).__name__} of {len(batch)} items; expected x_b, (x_b,) or "
                "(x_b, y_b) (inputs, then optional targets); a model with several positional inputs "
                "takes them as a dict batch, passed as keyword arguments (model(**batch))"
            )
        x, y = batch[0], (batch[1] if len(batch) == 2 else None)
        if y is not None and not isinstance(y, Tensor):
            raise TypeError(f"{where}: the targets (item 1) must be a torch.Tensor, got {type(y).__name__}")
    elif isinstance(batch, Mapping) and LABELS in batch:
        x, y = {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
        if not isinstance(y, Tensor):
            raise TypeError(f"{where}: {LABELS!r} must be a torch.Tensor of targets, got {type(y).__name__}")
    else:
        x, y = batch, None
    if not isinstance(x, (Tensor, Mapping, Batch)):
        raise TypeError(
            f"{where} is a {type(x).__name__}; expected a tensor (b, ...), a dict of tensors (b, ...) "
            "or a tuple (x_b, y_b) of them"
        )
    try:
        x = as_inputs(x, where)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (in {where})") from err
    if isinstance(x, Tensor) and x.dim() == 0:
        raise ValueError(f"{where} is a scalar tensor; expected a batch (b, ...) with the points on axis 0")
    return x, y


def _shape(trailing: tuple, dtype: torch.dtype) -> str:
    """'(b, 3, 4) float32': a batch's shape with its batch axis b."""
    return f"({', '.join(['b', *map(str, trailing)])}) {str(dtype).removeprefix('torch.')}"


class Stream:
    """A validated re-iterable of batches (see the module doc).

    Iterating yields ``(i, x_b, y_b)``: the batch index, the inputs (a tensor or a
    :class:`~fntk.inputs.batch.Batch`) and the targets (``None`` when the batch has none). Each pass
    checks every batch against batch 0; :attr:`n` (the number of points) is known after a first
    complete pass.

    Args:
        data: a ``DataLoader``, a list of batches, or any object whose ``iter()`` restarts.
        name: the argument's name, for messages.
        targets: ``True`` when every batch must carry targets (fits).
    """

    def __init__(self, data: Iterable, name: str = "x", targets: bool = False):
        if not is_loader(data):
            raise TypeError(
                f"{name} must be a re-iterable of batches (a DataLoader), got {type(data).__name__}"
            )
        if isinstance(data, Iterator):  # has __next__: a single pass (iter() of it is itself)
            raise TypeError(
                f"{name} is a one-shot iterator ({type(data).__name__}): fntk passes over the batches "
                "more than once (operators once per product); pass a re-iterable such as a "
                "torch.utils.data.DataLoader or a list of batches"
            )
        self.data, self.name, self.targets = data, name, targets
        self.n: int | None = None
        self._first: tuple | None = None

    @classmethod
    def of(cls, data: Iterable, name: str = "x", targets: bool = False) -> Stream:
        """``data`` itself if it is already a Stream, else ``Stream(data, name, targets)``."""
        return data if isinstance(data, Stream) else cls(data, name, targets)

    def __iter__(self) -> Iterator[tuple[int, Inputs, Tensor | None]]:
        count, i = 0, -1
        for i, batch in enumerate(self.data):
            x, y = _split(batch, i, self.name)
            self._check(i, x, y)
            count += rows(x)
            yield i, x, y
        if i < 0:
            raise ValueError(
                f"{self.name} is an empty loader: it yielded no batches; expected at least one batch of "
                "inputs (check the dataset's length and the DataLoader's drop_last)"
            )
        if self.n is not None and count != self.n:
            raise ValueError(
                f"{self.name} yielded {count} points on this pass but {self.n} on the first; fntk passes "
                "over the data more than once and needs the same points each time (shuffle=False, no "
                "random transforms)"
            )
        self.n = count

    def _check(self, i: int, x: Inputs, y: Tensor | None) -> None:
        where = f"batch {i} of {self.name}"
        if rows(x) == 0:
            raise ValueError(f"{where} is empty ({describe(x)}); every batch needs at least one point")
        sig = (signature(x), None if y is None else (tuple(y.shape[1:]), y.dtype))
        if self._first is None:
            self._first = sig
        elif sig[0] != self._first[0]:
            raise ValueError(
                f"{where} is {describe(x)} but batch 0 was {self._describe(self._first[0])}: every batch "
                "needs the same kind, keys, trailing shapes and dtypes (pad sequences to one length, "
                "e.g. a collate_fn with padding='max_length')"
            )
        elif sig[1] != self._first[1]:
            raise ValueError(
                f"{where} has targets {self._describe_y(sig[1])} but batch 0 had "
                f"{self._describe_y(self._first[1])}: every batch needs targets of the same trailing "
                "shape and dtype (or none)"
            )
        if self.targets and y is None:
            raise ValueError(
                f"{where} has no targets ({describe(x)}): a fit on batches needs (x_b, y_b) pairs (or a "
                f"dict batch with a {LABELS!r} entry), e.g. DataLoader(TensorDataset(x, y))"
            )
        if y is not None and (y.dim() == 0 or y.shape[0] != rows(x)):
            got = "a scalar" if y.dim() == 0 else f"{y.shape[0]} rows"
            raise ValueError(
                f"{where}: the inputs have {rows(x)} rows but the targets have {got}; each batch "
                "needs one target row per point"
            )

    @staticmethod
    def _describe(sig: tuple) -> str:
        if sig[0] == "tensor":
            return f"a tensor {_shape(sig[1], sig[2])}"
        return "a dict {" + ", ".join(f"{k!r}: {_shape(s, d)}" for k, s, d in sig[1:]) + "}"

    @staticmethod
    def _describe_y(sig: tuple | None) -> str:
        return "none" if sig is None else _shape(*sig)

    def inputs(self) -> Iterator[Inputs]:
        """The inputs of each batch, in order."""
        for _, x, _ in self:
            yield x

    def collect(self) -> tuple[Inputs, Tensor | None]:
        """All points in memory: (x (n, ...), y (n, ...) or None), the batches concatenated."""
        xs, ys = [], []
        for _, x, y in self:
            xs.append(x)
            ys.append(y)
        y = None if ys[0] is None else torch.cat(ys)
        return cat(xs), y


def num_batches(x: Any) -> int | None:
    """How many batches a loader yields when it says (``len(loader)``), else None."""
    try:
        return len(x) if is_loader(x) else 1
    except TypeError:
        return None


def collect_inputs(x: Any, name: str = "x") -> Any:
    """x itself unless it is given as batches; then the batches' inputs concatenated (targets dropped)."""
    return Stream.of(x, name).collect()[0] if is_loader(x) else x


def fit_data(x: Any, y: Any, name: str = "x") -> tuple[Any, Any]:
    """(x, y) for a fit: a loader of (x_b, y_b) batches (``y`` None) is collected into tensors; a
    dict with a ``"labels"`` entry (``y`` None) gives y from it; else (x, y) unchanged (y required)."""
    if isinstance(x, Mapping) and LABELS in x and y is None:
        return x, x[LABELS]  # as_inputs leaves the labels out of the model's inputs
    if is_loader(x):
        if y is not None:
            raise ValueError(
                f"y must be None when {name} is a loader of batches (got {describe(y)}): the targets come "
                f"from the batches, (x_b, y_b) pairs or a {LABELS!r} entry of dict batches"
            )
        return Stream.of(x, name, targets=True).collect()
    if y is None:
        raise TypeError(
            f"y is missing: pass targets y (n, ...) with {name}, or {name} as a loader yielding (x_b, y_b) "
            "batches, e.g. DataLoader(TensorDataset(x, y), batch_size=256)"
        )
    return x, y


__all__ = ["is_loader", "Stream", "num_batches", "collect_inputs", "fit_data"]
