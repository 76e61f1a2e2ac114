"""The empirical neural tangent kernel k(x, x') = J(x) J(x')ᵀ of a :class:`~fntk.Linearized` network.

``fntk.ntk(lin, x1, x2=None, method="auto", outputs="full", memory_budget=None)``, with the methods
of :class:`NTKMethod`: STRUCTURED (per-layer Grams from activations and output-gradients, J never
formed; :mod:`.structured`), CONTRACTION (chunked per-example Jacobians; :mod:`.contraction`),
PRODUCTS (NTK-vector products against unit vectors; :mod:`.products`) and AUTO (a cost and memory
model picks one; :mod:`.methods`). :mod:`.cache` forms dense kernels once (pools, caches).

This package is itself callable: ``fntk.ntk(...)`` is :func:`fntk.ntk.methods.ntk`, and its names
(``fntk.ntk.NTKMethod``, ``fntk.ntk.kernel_pool``, ...) stay reachable as attributes.
"""

import sys
import types

from fntk.errors import NTKMemoryError
from fntk.ntk.cache import cached_kernels, kernel_pool
from fntk.ntk.methods import NTKMethod, choose_method, ntk


class _CallableModule(types.ModuleType):
    """The module type of ``fntk.ntk``: calling it computes the kernel."""

    def __call__(self, *args, **kwargs):
        return ntk(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["ntk", "NTKMethod", "NTKMemoryError", "choose_method", "cached_kernels", "kernel_pool"]
