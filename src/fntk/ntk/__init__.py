"""The empirical neural tangent kernel k(x, x') = J(x) J(x')ᵀ of a :class:`~fntk.Linearized` network.

``ntk(lin, x1, x2=None, method="auto", outputs="full", memory_budget=None)``, with the methods of
:class:`NTKMethod`: STRUCTURED (per-layer Grams from activations and output-gradients, J never
formed; :mod:`.structured`), CONTRACTION (chunked per-example Jacobians; :mod:`.contraction`),
PRODUCTS (NTK-vector products against unit vectors; :mod:`.products`) and AUTO (a cost and memory
model picks one; :mod:`.methods`).
"""

from fntk.ntk.common import NTKMemoryError
from fntk.ntk.methods import NTKMethod, choose_method, ntk

__all__ = ["ntk", "NTKMethod", "NTKMemoryError", "choose_method"]
