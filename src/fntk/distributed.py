"""Data parallelism over ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

When a process group with more than one rank is initialised (e.g. under ``torchrun``), every rank
passes the *same* full inputs to fntk, and the products shard the data rows among the ranks:

- Jᵀu and G·v: each rank handles its rows, then the (p, r) results are all-reduced (summed);
- J·v, f(x), Jacobian and kernel rows: each rank computes its rows, which are all-gathered
  where the caller needs the whole result.

Communication per NTK product K V (n points, k outputs, p parameters, r columns, R ranks):
one all-reduce of p·r numbers (ring: ≈ 2·p·r·(R−1)/R per rank) and one all-gather of n·k·r numbers
(≈ n·k·r·(R−1)/R received per rank). A weight-space GGN product moves only the all-reduce.

This module imports nothing of fntk. Sharding can be switched off in a block with
:func:`local` (e.g. for work that is already per rank).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

_disabled = 0


def is_active() -> bool:
    """True when a process group of more than one rank is initialised and sharding is on."""
    return _disabled == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints and writes files."""
    return rank() == 0


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Turn sharding off inside the block (every rank computes everything itself)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def bounds(n: int, ranks: int | None = None) -> list[tuple[int, int]]:
    """Contiguous, balanced (start, stop) row blocks of n rows, one per rank."""
    R = ranks if ranks is not None else world_size()
    base, extra = divmod(n, R)
    out, start = [], 0
    for r in range(R):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def shard(n: int) -> slice:
    """This rank's rows of n."""
    start, stop = bounds(n)[rank()]
    return slice(start, stop)


def _backend_device(t: Tensor) -> torch.device:
    """gloo communicates CPU tensors, NCCL CUDA tensors."""
    return t.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of t over ranks (returned on t's device)."""
    buf = t.detach().to(_backend_device(t)).contiguous().clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def gather_rows(local_rows: Tensor, n: int) -> Tensor:
    """All-gather row shards (as given by :func:`bounds`) into the full (n, ...) tensor."""
    dev = _backend_device(local_rows)
    blocks = bounds(n)
    width = max(b - a for a, b in blocks)
    pad = local_rows.new_zeros((width, *local_rows.shape[1:]), device=dev)
    pad[: local_rows.shape[0]] = local_rows.detach().to(dev)
    parts = [torch.empty_like(pad) for _ in blocks]
    dist.all_gather(parts, pad)
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, blocks)]).to(local_rows.device)


def check_same(t: Tensor, name: str) -> None:
    """Raise ValueError on every rank when ``t`` differs between ranks (shape, dtype or values)."""
    if not is_active():
        return
    h = hashlib.sha256()
    h.update(str((tuple(t.shape), t.dtype)).encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.numel() else b"")
    mine = int.from_bytes(h.digest()[:7], "little")
    code = torch.tensor([mine], dtype=torch.int64)
    codes = [torch.zeros_like(code) for _ in range(world_size())]
    dist.all_gather(codes, code)
    if len({int(c) for c in codes}) != 1:
        raise ValueError(
            f"{name} differs between ranks (rank {rank()} of {world_size()}): under torch.distributed "
            "every rank must pass the same full inputs; fntk shards the rows itself"
        )


def init(backend: str | None = None, timeout_s: float = 60.0) -> None:
    """Initialise the default process group from torchrun's environment with a bounded timeout,
    so that a failing rank ends the others with an error instead of a hang."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def shutdown(ok: bool = True) -> None:
    """Tear down the default process group if it is initialised: after a barrier when every rank
    succeeded (so no rank destroys its side while a peer still talks to it), at once otherwise
    (a barrier could wait for a rank that has already failed)."""
    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


__all__ = [
    "is_active",
    "rank",
    "world_size",
    "is_main",
    "local",
    "bounds",
    "shard",
    "all_reduce_sum",
    "gather_rows",
    "check_same",
    "init",
    "shutdown",
]
