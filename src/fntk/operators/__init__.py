"""Matrix-free linear operators of a linearized network, as linear_operator ``LinearOperator``s.

- :class:`JacobianOperator` J(x): (n·k × p);
- :class:`NTKOperator` K = J(x1) J(x2)ᵀ: (n1·k × n2·k), or (n1 × n2) for one output;
- :class:`GGNOperator` G = Σ_i J_iᵀ H_i J_i: (p × p), with its exact diagonal;
- :mod:`.gram`: the weight-space Gram J_c(X)ᵀ J_c(X) of one output (GP regression).
"""

from fntk.operators.ggn import METHODS, GGNOperator
from fntk.operators.ggn_diagonal import ggn_dense, ggn_diagonal
from fntk.operators.jacobian import JacobianOperator
from fntk.operators.ntk import NTKOperator

__all__ = ["JacobianOperator", "NTKOperator", "GGNOperator", "ggn_diagonal", "ggn_dense", "METHODS"]
