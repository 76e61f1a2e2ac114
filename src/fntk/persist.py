"""Saving and loading fitted adapters (:class:`~fntk.NTKRegressor`, :class:`~fntk.LinearizedClassifier`).

File format (one file, written with ``torch.save`` and readable with ``torch.load(weights_only=True)``,
so loading never unpickles code)::

    {"format": "fntk-adapter", "meta": <JSON string>, "state": <JSON string>, "tensors": {key: Tensor}}

``meta`` is human-readable: fntk version, class, hyperparameters, the parameter selection, the
model's parameter names and shapes, and sha256 hashes of θ̂ (the selected parameters) and of the
whole model (parameters and buffers). ``state`` is the fitted object's attributes encoded as JSON,
with tensors referenced by key into ``tensors``. Every class whose objects may appear in a state
is registered here under a stable *kind* name (:func:`register`, independent of where the class
lives in the package); only registered classes are rebuilt (by ``__new__`` and attribute
assignment, never by running code from the file), and saving any other object is refused. A
class exports its own state with ``__fntk_state__()`` (default: its attributes) and rebuilds what
cannot be stored (operators, generators) in ``__fntk_restore__()``. Files of format 1 (fntk 0.1.0,
which named classes by module path) are read through a table of those paths. The
:class:`~fntk.Linearized` is not stored: :func:`load` rebuilds it from the model you pass, after
checking that the model's parameter names, shapes and values hash to what was saved. Because the
fitted factorisations themselves are stored, predictions after a round trip are bitwise identical.

The model itself is never written: the file holds what fntk learned, not the network.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fntk.likelihoods import Bernoulli, Categorical, Gaussian, HeteroscedasticGaussian, Poisson
from fntk.linearize import Linearized
from fntk.ntk import NTKMethod
from fntk.version import __version__

FORMAT = "fntk-adapter"
FORMAT_VERSION = 2
#: the kinds of the top-level objects that save/load
CLASSES = ("NTKRegressor", "LinearizedClassifier")
# Linearized attributes found from data (restored onto the rebuilt Linearized)
_LIN_STATE = ("_k", "_feature_shape", "_act_per_example", "_budget")

_KINDS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(kind: str) -> Callable[[T], T]:
    """Class decorator: objects of the class may be stored in a saved state under ``kind``."""

    def deco(cls: T) -> T:
        if _KINDS.get(kind, cls) is not cls:
            raise ValueError(f"persist: kind {kind!r} is already registered for {_KINDS[kind].__name__}")
        _KINDS[kind] = cls
        cls.__fntk_kind__ = kind
        return cls

    return deco


for _cls in (Gaussian, HeteroscedasticGaussian, Categorical, Bernoulli, Poisson, NTKMethod):
    register(f"{_cls.__module__.split('.')[1]}.{_cls.__name__}")(_cls)

#: format 1 (fntk 0.1.0) named classes by module path: path → kind (None: rebuilt on restore)
_FORMAT1 = {
    "fntk.gp.regressor:NTKRegressor": "NTKRegressor",
    "fntk.classify:LinearizedClassifier": "LinearizedClassifier",
    "fntk.gp._solvers:DenseFunction": "gp.DenseFunction",
    "fntk.gp._solvers:DenseWeight": "gp.DenseWeight",
    "fntk.gp._solvers:Factor": "gp.Factor",
    "fntk.gp._solvers:Hyper": "gp.Hyper",
    "fntk.gp._iterative:Iterative": "gp.Iterative",
    "fntk.gp._iterative:IterativeOptions": "gp.IterativeOptions",
    "fntk.gp._iterative:Krylov": "gp.Krylov",
    "fntk.laplace.function_space:FunctionSpace": "classify.FunctionSpace",
    "fntk.laplace.weight_space:WeightSpace": "classify.WeightSpace",
    "fntk.laplace.newton:Terms": "classify.Terms",
    "fntk.laplace.newton:FitInfo": "classify.FitInfo",
    "fntk.laplace.marglik:MarglikInfo": "classify.MarglikInfo",
    "fntk.vi:VIResult": "classify.VIResult",
    "fntk.likelihoods:Gaussian": "likelihoods.Gaussian",
    "fntk.likelihoods:HeteroscedasticGaussian": "likelihoods.HeteroscedasticGaussian",
    "fntk.likelihoods:Categorical": "likelihoods.Categorical",
    "fntk.likelihoods:Bernoulli": "likelihoods.Bernoulli",
    "fntk.likelihoods:Poisson": "likelihoods.Poisson",
    "fntk.ntk.methods:NTKMethod": "ntk.NTKMethod",
    "fntk.operators:NTKOperator": None,
    "fntk.curvature:GGNOperator": None,
}


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


def model_hashes(lin: Linearized, model: nn.Module) -> tuple[str, str]:
    """(hash of θ̂, hash of all of the model's parameters and buffers)."""
    theta = tensor_hash([(n, lin.theta_dict()[n]) for n in lin.names])
    everything = [(n, p) for n, p in model.named_parameters()] + [(n, b) for n, b in model.named_buffers()]
    return theta, tensor_hash(everything)


# ----------------------------------------------------------------------------------- encoding
class _Encoder:
    """Objects → JSON-able structure; tensors collected in ``self.tensors`` by key."""

    def __init__(self, lin: Linearized):
        self.lin = lin
        self.tensors: dict[str, Tensor] = {}
        self._ids: dict[int, str] = {}

    def __call__(self, obj: Any) -> Any:  # noqa: C901 (one branch per supported type)
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return {"__float": repr(obj)}  # keeps inf/nan and every bit
        if isinstance(obj, Tensor):
            key = self._ids.get(id(obj))
            if key is None:
                key = self._ids[id(obj)] = f"t{len(self.tensors)}"
                self.tensors[key] = obj.detach()
            return {"__t": key}
        if obj is self.lin:
            return {"__lin": 0}
        if isinstance(obj, torch.dtype):
            return {"__dtype": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"__device": str(obj)}
        if isinstance(obj, enum.Enum):
            return {"__enum": _kind(type(obj)), "value": self(obj.value)}
        if isinstance(obj, list):
            return {"__list": [self(v) for v in obj]}
        if isinstance(obj, tuple):  # includes torch.Size
            return {"__tuple": [self(v) for v in obj]}
        if isinstance(obj, (set, frozenset)):
            return {"__frozenset": [self(v) for v in sorted(obj, key=repr)]}
        if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
            return {"__dict": {k: self(v) for k, v in obj.items()}}
        kind = _kind(type(obj))
        state = obj.__fntk_state__() if hasattr(obj, "__fntk_state__") else vars(obj)
        return {"__obj": kind, "state": {k: self(v) for k, v in state.items()}}


def _kind(cls: type) -> str:
    kind = cls.__dict__.get("__fntk_kind__")
    if kind is None or _KINDS.get(kind) is not cls:
        raise TypeError(
            f"save: cannot store an object of type {cls.__module__}.{cls.__qualname__} (not a registered "
            "fntk state class); this adapter holds something fntk cannot save"
        )
    return kind


def _resolve(name: str, version: int) -> type | None:
    """The registered class of a kind (format 2) or module path (format 1); None: rebuilt later."""
    if version < 2:
        if name not in _FORMAT1:
            raise ValueError(f"class {name!r} is not one of fntk's")
        name = _FORMAT1[name]
        if name is None:
            return None
    cls = _KINDS.get(name)
    if cls is None:
        raise ValueError(f"class {name!r} is not one of fntk's")
    return cls


class _Decoder:
    def __init__(self, lin: Linearized, tensors: dict[str, Tensor], version: int):
        self.lin, self.tensors, self.version = lin, tensors, version
        self.objects: list[Any] = []

    def __call__(self, enc: Any) -> Any:  # noqa: C901
        if enc is None or isinstance(enc, (bool, int, str)):
            return enc
        if not isinstance(enc, dict) or len(enc) not in (1, 2):
            raise ValueError(f"unexpected entry {str(enc)[:80]!r}")
        if "__float" in enc:
            return float(enc["__float"])
        if "__t" in enc:
            return self.tensors[enc["__t"]]
        if "__lin" in enc:
            return self.lin
        if "__dtype" in enc:
            dt = getattr(torch, enc["__dtype"], None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"unknown dtype {enc['__dtype']!r}")
            return dt
        if "__device" in enc:
            return torch.device(enc["__device"])
        if "__enum" in enc:
            cls = _resolve(enc["__enum"], self.version)
            if cls is None or not issubclass(cls, enum.Enum):
                raise ValueError(f"{enc['__enum']!r} is not one of fntk's enums")
            return cls(self(enc["value"]))
        if "__list" in enc:
            return [self(v) for v in enc["__list"]]
        if "__tuple" in enc:
            return tuple(self(v) for v in enc["__tuple"])
        if "__frozenset" in enc:
            return frozenset(self(v) for v in enc["__frozenset"])
        if "__dict" in enc:
            return {k: self(v) for k, v in enc["__dict"].items()}
        if "__skip" in enc:
            return None
        if "__obj" in enc:
            cls = _resolve(enc["__obj"], self.version)
            if cls is None:  # an operator of format 1: rebuilt by its owner's __fntk_restore__
                return None
            obj = cls.__new__(cls)
            state = {k: self(v) for k, v in enc["state"].items()}
            obj.__dict__.update(state)
            self.objects.append(obj)
            return obj
        raise ValueError(f"unexpected entry {str(enc)[:80]!r}")


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
    """Write a fitted NTKRegressor or LinearizedClassifier to ``path`` (see the module doc)."""
    qual = type(obj).__dict__.get("__fntk_kind__")
    if qual not in CLASSES:
        raise TypeError(
            f"save: expected a fitted NTKRegressor or LinearizedClassifier, got {type(obj).__name__}"
        )
    fitted = getattr(obj, "_state", None) if qual == CLASSES[0] else getattr(obj, "_backend", None)
    if fitted is None:
        raise ValueError(f"save: this {type(obj).__name__} is not fitted yet: call fit(x, y) first")
    lin: Linearized = obj.lin
    module = lin.module
    theta_hash, _ = model_hashes(lin, module)
    enc = _Encoder(lin)
    state = enc(obj)
    meta = {
        "fntk_version": __version__,
        "format_version": FORMAT_VERSION,
        "class": qual,
        "hyperparameters": _hyperparameters(obj),
        "params": list(lin.names),
        "model_parameters": {n: list(p.shape) for n, p in module.named_parameters()},
        "dtype": str(lin.dtype).removeprefix("torch."),
        "theta_sha256": theta_hash,
        "model_sha256": _module_hash(module),
        "linearized": enc({k: getattr(lin, k) for k in _LIN_STATE}),
    }
    # tensors that lived on the model's device go back to the (new) model's device on load
    meta["on_model_device"] = sorted(k for k, t in enc.tensors.items() if t.device == lin.device)
    payload = {
        "format": FORMAT,
        "meta": json.dumps(meta, indent=1, default=str),
        "state": json.dumps(state),
        "tensors": enc.tensors,
    }
    torch.save(payload, os.fspath(path))


def _module_hash(module: nn.Module) -> str:
    named = [(n, p) for n, p in module.named_parameters()] + [(n, b) for n, b in module.named_buffers()]
    return tensor_hash(named)


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
    try:
        meta, state = json.loads(meta), json.loads(state)
    except json.JSONDecodeError as err:
        raise ValueError(f"fntk.load: {path!r} has corrupt JSON metadata: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("params"), list):
        raise bad
    meta["class"] = _class_kind(meta.get("class"), int(meta.get("format_version", 0)))
    if meta["class"] not in CLASSES:
        raise bad
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"fntk.load: {path!r} was written by a newer fntk ({meta.get('fntk_version')}, format "
            f"{meta.get('format_version')}); this fntk reads format {FORMAT_VERSION}"
        )
    return meta, state, tensors


def _class_kind(name: Any, version: int) -> Any:
    """The kind of a file's top-level class (format 1 wrote its module path)."""
    return _FORMAT1.get(name, name) if version < 2 else name


def load(path: str | os.PathLike, model: nn.Module) -> Any:
    """Load an adapter written by ``save`` and attach it to ``model`` (the same trained network).

    Raises ValueError (naming the file) when the file is corrupt or not an fntk file, or when
    ``model`` is not the network the adapter was fitted to: different parameter names or shapes,
    or different weights (sha256 of θ̂ and of all parameters and buffers).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fntk.load: model must be a torch.nn.Module, got {type(model).__name__}")
    meta, state, tensors = _read(path)
    p = os.fspath(path)
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
    lin = Linearized(model, meta["params"])
    theta_hash, _ = model_hashes(lin, lin.module)
    if theta_hash != meta.get("theta_sha256") or _module_hash(lin.module) != meta.get("model_sha256"):
        which = (
            "θ̂ (the selected parameters)"
            if theta_hash != meta.get("theta_sha256")
            else "fixed parameters/buffers"
        )
        raise ValueError(
            f"fntk.load: the model's weights differ from those {p!r} was fitted to (sha256 of {which} "
            "does not match); load with the same trained network, unchanged"
        )
    if lin.device.type != "cpu":
        on_dev = set(meta.get("on_model_device", []))
        tensors = {k: (t.to(lin.device) if k in on_dev else t) for k, t in tensors.items()}
    try:
        dec = _Decoder(lin, tensors, int(meta.get("format_version", 0)))
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


__all__ = ["save", "load", "read_metadata", "tensor_hash", "register"]
