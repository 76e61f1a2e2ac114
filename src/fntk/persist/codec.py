"""The state codec of saved adapters: registered state classes (:func:`register`), fitted objects
→ a JSON structure with tensors by key (:class:`Encoder`) and back (:class:`Decoder`), never
running code from the file; the format-1 (fntk 0.1.0) class paths."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from fntk.inputs import Batch
from fntk.likelihoods import Bernoulli, Categorical, Gaussian, HeteroscedasticGaussian, Poisson
from fntk.linearize import Linearized
from fntk.ntk import NTKMethod

FORMAT = "fntk-adapter"
FORMAT_VERSION = 3  # 3: "checksum"; "model_dtype" in meta
#: the kinds of the top-level objects that save/load
CLASSES = ("NTKRegressor", "LinearizedClassifier")
# Linearized attributes found from data (restored onto the rebuilt Linearized)
LIN_STATE = ("_k", "_feature_shape", "_act_per_example", "_budget")

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


for _cls in (Gaussian, HeteroscedasticGaussian, Categorical, Bernoulli, Poisson, NTKMethod, Batch):
    register(f"{_cls.__module__.split('.')[1]}.{_cls.__name__}")(_cls)

#: format 1 (fntk 0.1.0) named classes by module path: path → kind (None: rebuilt on restore)
FORMAT1 = {
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


# ----------------------------------------------------------------------------------- encoding
class Encoder:
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
            return {"__enum": kind_of(type(obj)), "value": self(obj.value)}
        if isinstance(obj, list):
            return {"__list": [self(v) for v in obj]}
        if isinstance(obj, tuple):  # includes torch.Size
            return {"__tuple": [self(v) for v in obj]}
        if isinstance(obj, (set, frozenset)):
            return {"__frozenset": [self(v) for v in sorted(obj, key=repr)]}
        if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
            return {"__dict": {k: self(v) for k, v in obj.items()}}
        kind = kind_of(type(obj))
        state = obj.__fntk_state__() if hasattr(obj, "__fntk_state__") else vars(obj)
        return {"__obj": kind, "state": {k: self(v) for k, v in state.items()}}


def kind_of(cls: type) -> str:
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
        if name not in FORMAT1:
            raise ValueError(f"class {name!r} is not one of fntk's")
        name = FORMAT1[name]
        if name is None:
            return None
    cls = _KINDS.get(name)
    if cls is None:
        raise ValueError(f"class {name!r} is not one of fntk's")
    return cls


class Decoder:
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



__all__ = ["register", "Encoder", "Decoder", "FORMAT", "FORMAT_VERSION", "FORMAT1", "CLASSES", "LIN_STATE",
           "kind_of"]
