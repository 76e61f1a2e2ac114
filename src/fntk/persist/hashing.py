"""sha256 hashes of tensors: the model fingerprints an adapter is checked against, the checksum of
a saved file, and the working linearization of low-precision models (float32 copy) whose hashes
are taken in the model's own dtype."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from fntk.linearize import Linearized


# ---------------------------------------------------------------------------------------- hashing
def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_hash(named: list[tuple[str, Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of the given tensors (order matters)."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _as(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def model_hashes(lin: Linearized, model: nn.Module, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(hash of θ̂, hash of all of the model's parameters and buffers), with floating tensors seen
    in ``dtype`` (the user's model dtype, for a float32 working copy of a low-precision model)."""
    theta = tensor_hash([(n, _as(lin.theta_dict()[n], dtype)) for n in lin.names])
    return theta, module_hash(model, dtype)


def payload_checksum(meta: str, state: str, tensors: dict[str, Tensor]) -> str:
    """sha256 over the meta and state strings and every tensor (sorted by key)."""
    h = hashlib.sha256()
    for text in (meta, state):
        h.update(text.encode())
        h.update(b"\0")
    h.update(tensor_hash([(k, tensors[k]) for k in sorted(tensors)]).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------- low precision
#: model dtypes whose kernels are too coarse for GP and Laplace algebra (8 and 11 significand bits)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def working_linearization(lin: Linearized) -> Linearized:
    """The linearization fntk's estimators compute with: ``lin`` itself, or, for a float16 or
    bfloat16 model, a float32 copy of it (its weights are exactly representable in float32).

    Why: a kernel rounded to the model's 8-11 bits is indefinite by ~ε·‖K‖ and its errors are
    amplified by the GP's (sK + σ²I)⁻¹ (measured with a bfloat16 MLP: posterior means 4 sd off,
    variances 100% off); through float32 products the results match the float64 computation of the
    same weights to float32 accuracy, and all algebra after the products is float64 as always.
    Defined here because :func:`load` must rebuild exactly the same linearization."""
    if lin.dtype not in LOW_PRECISION:
        return lin
    return lin.with_dtype(torch.float32)



def module_hash(module: nn.Module, dtype: torch.dtype | None = None) -> str:
    """sha256 of all of a module's parameters and buffers (floating ones seen in ``dtype``)."""
    named = [(n, p) for n, p in module.named_parameters()] + [(n, b) for n, b in module.named_buffers()]
    return tensor_hash([(n, _as(t, dtype)) for n, t in named])


__all__ = ["tensor_hash", "model_hashes", "module_hash", "payload_checksum", "working_linearization",
           "LOW_PRECISION"]
