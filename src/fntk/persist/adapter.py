"""save / load / read_metadata of fitted adapters (the file format: :mod:`fntk.persist`)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from fntk.linearize import Linearized
from fntk.linearize.outputs import OutputFn
from fntk.persist.codec import CLASSES, FORMAT, FORMAT1, FORMAT_VERSION, LIN_STATE, Decoder, Encoder
from fntk.persist.files import atomic_write, check_path
from fntk.persist.hashing import model_hashes, payload_checksum, working_linearization
from fntk.version import __version__


# -------------------------------------------------------------------------------------- save/load
def _hyperparameters(obj: Any) -> dict[str, Any]:
    """A readable summary of the fitted hyperparameters for the JSON metadata."""
    out: dict[str, Any] = {}
    names = (
        ("output", "space", "solver", "method", "mean", "space_", "solver_", "scale_", "noise_", "constant_")
        if type(obj).__name__ == "NTKRegressor"
        else ("inference", "prior_precision", "prior_mean", "link_approx", "space_", "prior_precision_")
    )
    for name in names:
        try:
            v = getattr(obj, name)
        except (AttributeError, ValueError):
            continue
        out[name] = v.tolist() if isinstance(v, Tensor) else v
    return out


def save(obj: Any, path: str | os.PathLike) -> None:
    """Write a fitted NTKRegressor or LinearizedClassifier to ``path`` (see the module doc),
    atomically: a failed or interrupted save leaves a previous file at ``path`` intact."""
    qual = type(obj).__dict__.get("__fntk_kind__")
    if qual not in CLASSES:
        raise TypeError(
            f"save: expected a fitted NTKRegressor or LinearizedClassifier, got {type(obj).__name__}"
        )
    fitted = getattr(obj, "_state", None) if qual == CLASSES[0] else getattr(obj, "_backend", None)
    if fitted is None:
        raise ValueError(f"save: this {type(obj).__name__} is not fitted yet: call fit(x, y) first")
    check_path(path)
    lin: Linearized = obj.lin
    module = lin.module
    model_dtype = getattr(obj, "_model_dtype", lin.dtype)
    theta_hash, model_hash = model_hashes(lin, module, model_dtype)
    enc = Encoder(lin)
    state = enc(obj)
    meta = {
        "fntk_version": __version__,
        "format_version": FORMAT_VERSION,
        "class": qual,
        "hyperparameters": _hyperparameters(obj),
        "params": list(lin.names),
        "output_fn": lin.output_fn is not None,  # a function is not stored: load takes it again
        "model_parameters": {n: list(p.shape) for n, p in module.named_parameters()},
        "dtype": str(lin.dtype).removeprefix("torch."),
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "theta_sha256": theta_hash,
        "model_sha256": model_hash,
        "linearized": enc({k: getattr(lin, k) for k in LIN_STATE}),
    }
    # tensors that lived on the model's device go back to the (new) model's device on load
    meta["on_model_device"] = sorted(k for k, t in enc.tensors.items() if t.device == lin.device)
    meta_s, state_s = json.dumps(meta, indent=1, default=str), json.dumps(state)
    payload = {
        "format": FORMAT,
        "meta": meta_s,
        "state": state_s,
        "tensors": enc.tensors,
        "checksum": payload_checksum(meta_s, state_s, enc.tensors),
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a saved adapter (no model needed)."""
    return _read(path)[0]


def _read(path: str | os.PathLike) -> tuple[dict, Any, dict[str, Tensor]]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"fntk.load: no such file {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, wrong format, unpickling refused, ...
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(
            f"fntk.load: {path!r} is not a readable fntk file (corrupt or truncated?): {msg}"
        ) from err
    bad = ValueError(f"fntk.load: {path!r} is not an fntk adapter file (missing or malformed fields)")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise bad
    meta, state, tensors = payload.get("meta"), payload.get("state"), payload.get("tensors")
    if not (isinstance(meta, str) and isinstance(state, str) and isinstance(tensors, dict)):
        raise bad
    if not all(isinstance(k, str) and isinstance(t, Tensor) for k, t in tensors.items()):
        raise bad
    checksum = payload.get("checksum")
    if checksum is not None and checksum != payload_checksum(meta, state, tensors):
        raise ValueError(
            f"fntk.load: {path!r} is corrupt: its contents do not match the sha256 checksum written "
            "with it (changed or damaged on disk); refit and save it again, or restore a backup"
        )
    try:
        meta, state = json.loads(meta), json.loads(state)
    except json.JSONDecodeError as err:
        raise ValueError(f"fntk.load: {path!r} has corrupt JSON metadata: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("params"), list):
        raise bad
    meta["class"] = _class_kind(meta.get("class"), int(meta.get("format_version", 0)))
    if meta["class"] not in CLASSES:
        raise bad
    if checksum is None and int(meta.get("format_version", 0)) >= 3:
        raise ValueError(f"fntk.load: {path!r} is corrupt: its checksum is missing")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"fntk.load: {path!r} was written by a newer fntk ({meta.get('fntk_version')}, format "
            f"{meta.get('format_version')}); this fntk reads format {FORMAT_VERSION}"
        )
    return meta, state, tensors


def _class_kind(name: Any, version: int) -> Any:
    """The kind of a file's top-level class (format 1 wrote its module path)."""
    return FORMAT1.get(name, name) if version < 2 else name


def load(path: str | os.PathLike, model: nn.Module, output_fn: OutputFn | None = None) -> Any:
    """Load an adapter written by ``save`` and attach it to ``model`` (the same trained network).

    ``output_fn``: the output selection the adapter was fitted with (``Linearized(output_fn=...)``),
    if any; functions are not stored, so pass the same one again (refused when it is missing or
    when the adapter was fitted without one).

    Raises ValueError (naming the file) when the file is corrupt or not an fntk file, or when
    ``model`` is not the network the adapter was fitted to: different parameter names or shapes,
    or different weights (sha256 of θ̂ and of all parameters and buffers).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fntk.load: model must be a torch.nn.Module, got {type(model).__name__}")
    meta, state, tensors = _read(path)
    p = os.fspath(path)
    fitted_with = bool(meta.get("output_fn", False))
    if fitted_with != (output_fn is not None):
        raise ValueError(
            f"fntk.load: {p!r} was fitted {'with' if fitted_with else 'without'} an output_fn; "
            + ("pass the same one: fntk.load(path, model, output_fn=...)" if fitted_with
               else "load it without output_fn")
        )
    saved_shapes = meta.get("model_parameters", {})
    shapes = {n: list(t.shape) for n, t in model.named_parameters()}
    if shapes != saved_shapes:
        missing = sorted(set(saved_shapes) - set(shapes))
        extra = sorted(set(shapes) - set(saved_shapes))
        differ = sorted(n for n in set(shapes) & set(saved_shapes) if shapes[n] != saved_shapes[n])
        raise ValueError(
            f"fntk.load: {p!r} was fitted to a different model: parameters missing {missing}, "
            f"unexpected {extra}, with other shapes {differ}"
        )
    lin = Linearized(model, meta["params"], output_fn=output_fn)
    theta_hash, model_hash = model_hashes(lin, lin.module)
    if theta_hash != meta.get("theta_sha256") or model_hash != meta.get("model_sha256"):
        which = (
            "θ̂ (the selected parameters)"
            if theta_hash != meta.get("theta_sha256")
            else "fixed parameters/buffers"
        )
        raise ValueError(
            f"fntk.load: the model's weights differ from those {p!r} was fitted to (sha256 of {which} "
            "does not match); load with the same trained network, unchanged"
        )
    version = int(meta.get("format_version", 0))
    if version >= 3:  # the estimators of format 3 compute with the working linearization
        lin = working_linearization(lin)
    if lin.device.type != "cpu":
        on_dev = set(meta.get("on_model_device", []))
        tensors = {k: (t.to(lin.device) if k in on_dev else t) for k, t in tensors.items()}
    try:
        dec = Decoder(lin, tensors, version)
        for k, v in dec(meta.get("linearized", {"__dict": {}})).items():
            setattr(lin, k, v)
        obj = dec(state)
        for o in dec.objects:
            restore = getattr(o, "__fntk_restore__", None)
            if restore is not None:
                restore()
    except (KeyError, ValueError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"fntk.load: {p!r} holds a malformed fitted state: {type(err).__name__}: {err}"
        ) from err
    if type(obj).__dict__.get("__fntk_kind__") != meta["class"]:
        raise ValueError(f"fntk.load: {p!r} holds a {type(obj).__name__}, expected {meta['class']}")
    return obj


__all__ = ["save", "load", "read_metadata"]
