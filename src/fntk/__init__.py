"""fntk: analytic transfer learning through the linearization of a pretrained PyTorch network."""

from fntk._validation import NotFittedError
from fntk.classify import LinearizedClassifier
from fntk.curvature import GGNOperator
from fntk.gp import NTKRegressor
from fntk.linearize import Linearized, get_memory_budget, set_memory_budget
from fntk.ntk import NTKMethod, ntk
from fntk.operators import JacobianOperator, NTKOperator
from fntk.persist import load

__version__ = "0.1.0"

__all__ = [
    "Linearized",
    "JacobianOperator",
    "NTKOperator",
    "ntk",
    "NTKMethod",
    "NTKRegressor",
    "GGNOperator",
    "LinearizedClassifier",
    "NotFittedError",
    "get_memory_budget",
    "set_memory_budget",
    "load",
    "__version__",
]
