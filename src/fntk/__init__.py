"""fntk: analytic transfer learning through the linearization of a pretrained PyTorch network."""

from fntk import inputs, ntk
from fntk.classify import LinearizedClassifier
from fntk.errors import NotFittedError, NTKMemoryError, NumericalWarning, TimeLimitError
from fntk.gp import NTKRegressor
from fntk.linearize import Linearized
from fntk.ntk import NTKMethod
from fntk.operators import GGNOperator, JacobianOperator, NTKOperator
from fntk.persist import load
from fntk.settings import get_memory_budget, set_memory_budget
from fntk.version import __version__

__all__ = [
    "Linearized",
    "inputs",
    "JacobianOperator",
    "NTKOperator",
    "ntk",
    "NTKMethod",
    "NTKRegressor",
    "GGNOperator",
    "LinearizedClassifier",
    "NotFittedError",
    "NTKMemoryError",
    "NumericalWarning",
    "TimeLimitError",
    "get_memory_budget",
    "set_memory_budget",
    "load",
    "__version__",
]
