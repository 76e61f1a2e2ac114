"""The block machinery of the NTK methods: output modes, block Grams, memory planning, the driver.

Shapes: n1, n2 points, k network outputs, k' the outputs a call works with (k' = 1 for a single
output, else k), q the length of a per-example feature (e.g. a parameter gradient).

Canonical (internal) results: ``"full"`` mode is (n1, k', n2, k'); ``"independent"`` mode is
(k', n1, n2), K[c] = J_c(x1) J_c(x2)ᵀ. :meth:`Outputs.finalize` gives the public shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fntk.errors import NTKMemoryError

GiB = float(1024**3)
#: Working numbers per point and tangent/cotangent, in units of the activations of the network's
#: modules (``Linearized``'s count): functional ops between modules, saved tensors and batched
#: gradients of every intermediate make the real footprint several times the module outputs.
ACT_FACTOR = 6

Feats = list  # a list of tensors, each with the points on its leading axis


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.3g} GiB"


@dataclass(frozen=True)
class Outputs:
    """Which kernel is wanted. mode: "full" (all output pairs) or "independent" (K[c] per output);
    index: the output c of a single-output kernel (then k' = 1 and mode is "full")."""

    mode: str
    k: int
    index: int | None = None

    @classmethod
    def parse(cls, outputs: int | str, k: int) -> Outputs:
        if isinstance(outputs, str):
            if outputs not in ("full", "independent"):
                raise ValueError(f"outputs must be 'full', 'independent' or an int, got {outputs!r}")
            return cls("full" if k == 1 else outputs, k)
        if isinstance(outputs, bool) or not isinstance(outputs, int):
            raise ValueError(f"outputs must be 'full', 'independent' or an int, got {outputs!r}")
        if not -k <= outputs < k:
            raise ValueError(f"outputs={outputs} is out of range for a model with k={k} outputs")
        return cls("full", k, outputs % k)

    @property
    def kk(self) -> int:
        """k': the number of outputs whose Jacobian rows are used."""
        return 1 if self.index is not None else self.k

    def shape(self, n1: int, n2: int) -> tuple[int, ...]:
        kk = self.kk
        return (n1, kk, n2, kk) if self.mode == "full" else (kk, n1, n2)

    def nbytes(self, n1: int, n2: int, dtype: torch.dtype) -> int:
        return math.prod(self.shape(n1, n2)) * _itemsize(dtype)

    def cotangents(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """One-hot output cotangents (k', n, k): E[c, i, out_c] = 1."""
        E = torch.zeros(self.kk, n, self.k, dtype=dtype, device=device)
        cols = [self.index] if self.index is not None else range(self.k)
        for c, o in enumerate(cols):
            E[c, :, o] = 1
        return E

    def finalize(self, out: Tensor) -> Tensor:
        """Canonical → public shape: (n1, n2) when k' == 1, else unchanged."""
        if self.kk != 1:
            return out
        return out.reshape(out.shape[0], out.shape[2]) if self.mode == "full" else out[0]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def gram(X1: Tensor, X2: Tensor, mode: str) -> Tensor:
    """Σ_q X1[i,c,q] X2[j,d,q]: X1 (b1, k', q), X2 (b2, k', q) → (b1, k', b2, k') or (k', b1, b2)."""
    b1, kk, q = X1.shape
    b2 = X2.shape[0]
    if mode == "full":
        return (X1.reshape(b1 * kk, q) @ X2.reshape(b2 * kk, q).T).view(b1, kk, b2, kk)
    return torch.bmm(X1.transpose(0, 1), X2.permute(1, 2, 0))


def write_block(out: Tensor, blk: Tensor, s1: slice, s2: slice, mode: str, mirror: bool) -> None:
    """out[s1, s2] = blk (and out[s2, s1] = blkᵀ when ``mirror``), in canonical layout."""
    if mode == "full":
        out[s1, :, s2, :] = blk
        if mirror:
            out[s2, :, s1, :] = blk.permute(2, 3, 0, 1)
    else:
        out[:, s1, s2] = blk
        if mirror:
            out[:, s2, s1] = blk.transpose(1, 2)


def symmetrize(blk: Tensor, mode: str) -> Tensor:
    """(B + Bᵀ)/2 for a diagonal block, so that a symmetric kernel is exactly symmetric."""
    t = blk.permute(2, 3, 0, 1) if mode == "full" else blk.transpose(1, 2)
    return (blk + t) / 2


@dataclass(frozen=True)
class Blocks:
    """A block plan: rows of x1 in chunks of b1; x2 either cached whole (``cache2``) or in chunks
    of b2 recomputed for every row chunk; ``work`` bounds one feature computation (points)."""

    b1: int
    b2: int
    cache2: bool

    @property
    def work(self) -> int:
        return self.b1


def plan_blocks(
    n1: int, n2: int, sym: bool, per_point: float, per_work: float, per_pair: float, avail: float,
    what: str, rows_per_point: int = 1,
) -> Blocks:
    """Largest blocks whose working set fits ``avail`` bytes (the budget minus the output).

    per_point: bytes of kept features per point; per_work: transient bytes to compute them, per
    point; per_pair: transient bytes of a Gram block per (i, j) pair; rows_per_point: kernel rows
    per point (k'). Prefers caching the features of all of x2 (of x1 when symmetric), so that each
    is computed once.
    """
    kept = n2 * per_point  # symmetric: all of x1's features, computed in chunks of b1
    row = per_work + n2 * per_pair + (0 if sym else per_point)
    b_cached = int((avail - kept) // max(row, 1.0)) if kept < avail else 0
    nblocks = min(8, n1 * rows_per_point // 256)
    if sym and nblocks > 1:  # row blocks against the columns from the diagonal on: ~half the pairs
        b_cached = min(b_cached, -(-n1 // nblocks))
    if b_cached >= min(n1, 16):
        return Blocks(min(b_cached, n1), n2, True)
    # square blocks b: b (2 per_point + per_work) + b² per_pair <= avail
    a, b_, c = per_pair, 2 * per_point + per_work, -avail
    b = int((-b_ + math.sqrt(b_ * b_ - 4 * a * c)) / (2 * a)) if a > 0 else int(avail // b_)
    if b_cached >= max(b, 1):
        return Blocks(min(b_cached, n1), n2, True)
    if b < 1:
        need = 2 * per_point + per_work + per_pair
        raise NTKMemoryError(
            f"{what}: even one point at a time needs about {gib(need)} of working memory beyond the "
            f"output, but only {gib(max(avail, 0))} of the budget is left; raise memory_budget "
            "(argument, Linearized(memory_budget=...) or fntk.set_memory_budget)"
        )
    return Blocks(min(b, n1), min(b, n2), False)


def pairs(n1: int, n2: int, sym: bool, b1: int) -> float:
    """Point pairs whose Gram :func:`run_blocks` computes (symmetric: row blocks from the diagonal)."""
    return n1 * (n1 + b1) / 2 if sym else float(n1 * n2)


def fill(fn: Callable[[slice], Feats], n: int, size: int) -> Feats:
    """fn over consecutive chunks of ≤ size points, written into preallocated tensors (no cat)."""
    out: Feats | None = None
    for s in chunks(n, size):
        part = fn(s)
        if out is None:
            if s.stop == n:
                return part
            out = [t.new_empty((n, *t.shape[1:])) for t in part]
        for o, t in zip(out, part):
            o[s] = t
    return out if out is not None else []


def chunks(n: int, size: int, start: int = 0) -> list[slice]:
    size = max(1, int(size))
    return [slice(i, min(i + size, n)) for i in range(start, n, size)]


def run_blocks(
    shape: Sequence[int], mode: str, n1: int, n2: int, sym: bool, blocks: Blocks,
    feats1: Callable[[slice], Feats], feats2: Callable[[slice], Feats],
    gram_fn: Callable[[Feats, Feats], Tensor], dtype: torch.dtype, device: torch.device,
) -> Tensor:
    """Assemble the canonical kernel from per-block Grams of per-point features.

    feats1/feats2(s) → features of x1[s]/x2[s] (lists of tensors, points first); gram_fn(F1, F2)
    → the block in canonical layout. When ``sym`` (x2 = x1), only blocks on or above the diagonal
    are computed and mirrored, diagonal blocks symmetrized.
    """
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    b1 = blocks.b1
    F2all = fill(feats2, n2, blocks.work) if blocks.cache2 else None
    for s1 in chunks(n1, b1):
        if F2all is not None:
            F1 = [t[s1] for t in F2all] if sym else feats1(s1)
            cols = [slice(s1.start, n2)] if sym else [slice(0, n2)]
        else:
            F1 = feats1(s1)
            cols = chunks(n2, blocks.b2, start=s1.start if sym else 0)
        for s2 in cols:
            if F2all is not None:
                F2 = [t[s2] for t in F2all]
            else:
                F2 = F1 if sym and s2 == s1 else feats2(s2)
            blk = gram_fn(F1, F2)
            if sym and s2.start == s1.start:  # the block's first columns are the diagonal block
                d = s1.stop - s1.start
                diag = symmetrize(_cols(blk, slice(0, d), mode), mode)
                write_block(out, diag, s1, s1, mode, mirror=False)
                if s2.stop > s1.stop:
                    rest = slice(s2.start + d, s2.stop)
                    write_block(out, _cols(blk, slice(d, None), mode), s1, rest, mode, mirror=True)
            else:
                write_block(out, blk, s1, s2, mode, mirror=sym)
            del blk
    return out


def _cols(blk: Tensor, s: slice, mode: str) -> Tensor:
    return blk[:, :, s, :] if mode == "full" else blk[:, :, s]
