"""How a :class:`~fntk.Linearized` takes its inputs: checking them (tensors, dicts of tensors,
loaders of batches), going batch by batch and in row chunks across batches, and the maps that
combine batches (Σ_b J(x_b)ᵀ u_b; the Jacobian batch by batch under the memory budget).

Functions of the Linearized (its methods delegate here), as :mod:`.second_order`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from fntk import distributed, inputs
from fntk.errors import NTKMemoryError
from fntk.inputs import Inputs
from fntk.linearize import checks, first_call, probes

#: a Linearized (it imports this module, so it is not imported here)
Linearized = Any


def check_input(lin: Linearized, x: Inputs | Iterable, name: str = "x") -> Inputs:
    """Validate x (n, *feature_shape), or a dict of such tensors, and move it to the model's
    device (floating-point tensors also to its dtype; integer and boolean ones unchanged). A
    re-iterable of batches (DataLoader) is validated batch by batch (errors name the batch) and
    collected into one tensor or dict in memory. The first call runs the capability probes on
    its first points."""
    x = checks.check_inputs(inputs.collect_inputs(x, name), name, lin.dtype, lin.device,
                            lin._int_inputs)
    shape = inputs.feature_shape(x)
    if lin._feature_shape is not None and shape != tuple(map(as_tuple, lin._feature_shape)):
        expected = lin._feature_shape
        if isinstance(x, Tensor) and all(isinstance(d, int) for d in expected):
            raise ValueError(
                f"{name} has feature shape {shape} (full shape {tuple(x.shape)}), expected "
                f"(n, {', '.join(map(str, expected))}) as in earlier calls"
            )
        raise ValueError(
            f"{name} is {inputs.describe(x)}; expected the keys and trailing shapes {expected} "
            "(key, *shape after the batch axis; a bare shape for a tensor) as in earlier calls"
        )
    if lin._caps is None:
        with lin._session():
            if lin._caps is None:  # another thread may have probed meanwhile
                first_call.setup(lin, x, name)
    for key, t in ([(None, x)] if isinstance(x, Tensor) else x.items()):
        distributed.check_same(t, name if key is None else f"{name}[{key!r}]")
    return x


def batches(lin: Linearized, x: Inputs | Iterable, name: str = "x") -> Iterator[Inputs]:
    """The checked inputs batch by batch: in-memory x as one batch; a re-iterable of batches
    (DataLoader) batch by batch, each validated against the first (see
    :class:`fntk.inputs.Stream`) and checked by :func:`check_input` (named ``batch i of x``)."""
    if not inputs.is_loader(x):
        yield check_input(lin, x, name)
        return
    for i, xb, _ in inputs.Stream.of(x, name):
        yield check_input(lin, xb, f"batch {i} of {name}")


def row_chunks(lin: Linearized, x: Inputs | Iterable, size: int | None = None
               ) -> Iterator[tuple[Inputs, slice]]:
    """(inputs, rows) in chunks of ≤ ``size`` points (None: whole batches): checked in-memory x
    split into chunks; a loader (or :class:`fntk.inputs.Stream`) batch by batch (checked, see
    :func:`batches`), each batch split alike. The rows count from the first point of x, across
    batches; the products that sum over points (GGN products and diagonals) stream this way."""
    if not inputs.is_loader(x):
        for s in chunks(inputs.rows(x), size or inputs.rows(x)):
            yield x[s], s
        return
    start = 0
    for xb in batches(lin, x):
        b = inputs.rows(xb)
        for s in chunks(b, size or b):
            yield xb[s], slice(start + s.start, start + s.stop)
        start += b


def vjp_batches(lin: Linearized, x: Iterable, u: Tensor) -> Tensor:
    """Σ_b J(x_b)ᵀ u[rows of b] over the batches of a loader x (see :meth:`Linearized.vjp`)."""
    if not isinstance(u, Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")
    out, done = None, 0
    for xb in batches(lin, x):
        b = inputs.rows(xb)
        if u.dim() == 0 or u.shape[0] < done + b:
            have = "a scalar" if u.dim() == 0 else f"{u.shape[0]} rows"
            raise ValueError(f"u has {have} but x yields more points ({done + b} up to this batch); "
                             "u needs one row per point of the loader, in its order")
        part = lin.vjp(xb, u[done : done + b])
        out, done = part if out is None else out + part, done + b
    if u.shape[0] != done:
        raise ValueError(f"u has {u.shape[0]} rows but x yields {done} points; u needs one row per "
                         "point of the loader, in its order")
    return out


def jacobian_batches(lin: Linearized, x: Iterable) -> Tensor:
    """J(x) (n, k, p) batch by batch over a loader x, concatenated; NTKMemoryError before the
    batch that would take the whole Jacobian over the memory budget."""
    parts, done = [], 0
    for xb in batches(lin, x):
        done += inputs.rows(xb)
        check_jacobian_size(lin, done, lin.num_outputs)
        parts.append(lin.jacobian_mat(xb))
    return torch.cat(parts)


def check_jacobian_size(lin: Linearized, n: int, k: int) -> None:
    """NTKMemoryError when an (n, k, p) Jacobian exceeds the memory budget, before allocating it."""
    need = n * k * lin.num_params * torch.finfo(lin.dtype).bits // 8
    if need > lin.memory_budget:
        gib = 1024**3
        raise NTKMemoryError(
            f"the Jacobian of shape ({n}, {k}, {lin.num_params}) ({lin.dtype}) needs "
            f"{need / gib:.3g} GiB, more than the memory budget of {lin.memory_budget / gib:.3g} "
            "GiB; use products (jvp/vjp, JacobianOperator), fewer points or parameters, or raise "
            "memory_budget (Linearized(memory_budget=...) or fntk.set_memory_budget)"
        )


def as_tuple(d: object) -> object:
    """A stored feature-shape entry as compared with :func:`fntk.inputs.feature_shape` (lists, as
    reloaded from JSON, become tuples)."""
    return tuple(d) if isinstance(d, list) else d


def rows_per_chunk(lin: Linearized, r: int, extra_per_row: int = 0) -> int:
    """How many points fit the memory budget when each carries r tangent/cotangent copies.

    The working set of a batched product is about (1 + r) copies of the activations, plus
    ``extra_per_row`` elements per point (e.g. Jacobian rows); a factor 3 covers autodiff's
    saved tensors.
    """
    act = lin.activation_numel
    per_row = (3 * act * (1 + r) + extra_per_row) * torch.finfo(lin.dtype).bits // 8
    return max(1, lin.memory_budget // max(per_row, 1))


#: activations (bytes) one forward-only chunk may produce on a CPU. Measured (LeNet-5, 500 images,
#: 151 kB of module outputs each, float32, one thread): 0.25 s in one chunk (75 MB), 0.18 s in
#: chunks of 200 (30 MB), 0.13 s in chunks of 100-128 (15-19 MB), 0.14 s of 64: large outputs
#: leave the cache and come fresh from the OS (zero-filled pages) on every call.
FORWARD_CHUNK_BYTES = 16 * 2**20
#: the smallest forward-only chunk (per-call overhead)
FORWARD_MIN_ROWS = 16


def forward_rows(lin: Linearized) -> int:
    """Points per chunk of a forward-only pass (no tangents): the memory budget's
    :func:`rows_per_chunk` (r = 0), on a CPU also at most FORWARD_CHUNK_BYTES of module outputs
    (but ≥ FORWARD_MIN_ROWS). An accelerator takes the budget's chunks (its allocator keeps
    memory, and wide batches use it better)."""
    size = rows_per_chunk(lin, 0)
    if lin.device.type != "cpu":
        return size
    per_row = lin.activation_numel * torch.finfo(lin.dtype).bits // 8
    return min(size, max(FORWARD_MIN_ROWS, FORWARD_CHUNK_BYTES // max(per_row, 1)))


def channels_last(lin: Linearized) -> bool:
    """Whether forward-only passes run convolutions in channels_last memory format (4-d weights
    and image batches): on a CPU, for a model with a Conv2d (probed once, recorded in
    ``capabilities.layout``), when on the probe batch its outputs agree with the standard layout's
    to the probes' tolerance (they differ by rounding: another convolution kernel). oneDNN then
    skips its layout reorders: LeNet-5 forwards of 500 images in chunks of 110, one thread, 0.071 s
    instead of 0.138 s."""
    caps = lin.capabilities
    if caps.layout is None:
        caps.layout = _probe_layout(lin)
    return caps.layout == "channels_last"


def _images(x: Inputs) -> bool:
    return isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point()


def _to_channels_last(t: Tensor) -> Tensor:
    """A channels_last copy of a 4-d t with the canonical strides: ``t.contiguous(memory_format=...)``
    returns t itself when one channel makes both layouts match, and then the convolution keeps
    the standard kernel (LeNet-5's first layer: 0.16 s instead of 0.08 s for the forward)."""
    out = torch.empty_like(t, memory_format=torch.channels_last)
    return out.copy_(t)


def _channels_last_params(lin: Linearized) -> dict[str, Tensor]:
    """θ̂ with every 4-d tensor of the model (selected or fixed) as a channels_last copy."""
    out = dict(lin.theta_dict())
    for name, t in {**lin._fixed, **out}.items():
        if t.dim() == 4:
            out[name] = _to_channels_last(t)
    return out


def _probe_layout(lin: Linearized) -> str:
    xb = lin._probe_x
    if not (_images(xb) and lin.device.type == "cpu"
            and any(isinstance(m, torch.nn.Conv2d) for m in lin.module.modules())):
        return "standard"
    with lin._session(grad=False):
        try:
            ref = lin.function(xb)(lin.theta_dict())
            xc = _to_channels_last(xb)
            out = lin.function(xc)(_channels_last_params(lin))
        except RuntimeError as err:  # e.g. a .view() that needs contiguous NCHW activations
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            lin.capabilities.rejected["layout:channels_last"] = why
            return "standard"
    ok, rel = probes.close(out, ref, probes.tolerance(lin.dtype))
    if not ok:
        lin.capabilities.rejected["layout:channels_last"] = f"disagrees with the standard layout by {rel:.2g}"
        return "standard"
    return "channels_last"


def forward_pass(lin: Linearized, x: Inputs) -> tuple[list[Inputs], dict[str, Tensor]]:
    """What a forward-only pass over checked x feeds the model: (x in chunks of
    :func:`forward_rows` points, the parameter dict for ``lin.function(chunk)``), both in
    channels_last where :func:`channels_last` holds (copies: x and the model are never changed)."""
    parts = [x[s] for s in chunks(x.shape[0], forward_rows(lin))]
    if not (_images(x) and channels_last(lin)):
        return parts, lin.theta_dict()
    return [_to_channels_last(p) for p in parts], _channels_last_params(lin)


def forward_outputs(lin: Linearized, x: Inputs) -> Tensor:
    """f(x; θ̂) (n, k) for checked x by the chunks and layout of :func:`forward_pass`."""
    parts, theta = forward_pass(lin, x)
    with lin._session(grad=False):
        return torch.cat([lin.function(xp)(theta) for xp in parts])


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of ≤ size rows covering range(n)."""
    size = max(1, int(size))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def by_rank(fn: Callable[..., Tensor], x: Inputs, *row_args: Tensor) -> Tensor:
    """fn(x, *row_args) on all rows; under torch.distributed each rank does its shard of the
    rows and the row blocks are all-gathered."""
    if not distributed.is_active():
        return fn(x, *row_args)
    n, s = x.shape[0], distributed.shard(x.shape[0])
    if s.stop > s.start:
        local = fn(x[s], *(a[s] for a in row_args))
    else:  # more ranks than rows: an empty block of the right trailing shape
        local = fn(x[:1], *(a[:1] for a in row_args))[:0]
    return distributed.gather_rows(local, n)
