"""Model inputs, one mechanism for the whole library (imports nothing of fntk above it).

- :mod:`.batch`: inputs held in memory, a tensor x (n, ...) or a :class:`Batch` (a dict of tensors
  batched along axis 0, passed to the model as ``model(**batch)``), and their row operations:
  :func:`rows`, slicing/index selection (``x[index]``), :func:`cat`, :func:`cast`, the per-point
  views torch.func maps over (:func:`tree`, :func:`point_batch`) and :func:`call_args`.
- :mod:`.loader`: inputs given as batches (a ``DataLoader`` or any re-iterable), validated batch by
  batch (:class:`Stream`): entry points that stream (predictions, Jacobian products, GGN products
  and diagonals) go batch by batch; the others collect the inputs (:func:`collect_inputs`,
  :func:`fit_data`).
"""

from fntk.inputs.batch import (
    LABELS,
    Batch,
    Index,
    Inputs,
    as_inputs,
    call_args,
    cast,
    cat,
    describe,
    feature_shape,
    map_tensors,
    point_batch,
    repeat_first,
    row_keys,
    rows,
    signature,
    tree,
)
from fntk.inputs.loader import Stream, collect_inputs, fit_data, is_loader, num_batches

__all__ = [
    "Batch", "Index", "Inputs", "as_inputs", "call_args", "cast", "cat", "describe", "feature_shape",
    "map_tensors", "point_batch", "repeat_first", "row_keys", "rows", "signature", "tree",
    "LABELS", "Stream", "collect_inputs", "fit_data", "is_loader", "num_batches",
]
