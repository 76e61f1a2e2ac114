r"""Curvature of a linearized network, under its public name: the generalized Gauss-Newton (GGN) /
Fisher operator with its exact diagonal and dense form (:mod:`fntk.operators`), and the estimators
and Lanczos roots used with it (:mod:`fntk.linalg`).
"""

from fntk.linalg.estimators import hutchinson_diagonal
from fntk.linalg.lanczos import lanczos_root
from fntk.operators.ggn import METHODS, REDUCTIONS, GGNOperator
from fntk.operators.ggn_diagonal import ggn_dense, ggn_diagonal

__all__ = [
    "GGNOperator",
    "ggn_diagonal",
    "ggn_dense",
    "hutchinson_diagonal",
    "lanczos_root",
    "METHODS",
    "REDUCTIONS",
]
