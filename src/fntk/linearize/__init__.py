"""The linearization of a trained network and the one autodiff engine every computation uses.

- :class:`Linearized`: θ̂ snapshot, parameter selection, f, J·v, Jᵀ·u, per-example Jacobians.
- :mod:`.engine`: the pure ``torch.func`` maps behind it.
- :mod:`.taps`: layer taps (layer inputs and output gradients) for the structured kernels and
  GGN diagonals.
"""

from fntk.linearize.linearized import Linearized
from fntk.linearize.selection import ParamSelection, select
from fntk.settings import DEFAULT_MEMORY_BUDGET, get_memory_budget, set_memory_budget

__all__ = [
    "Linearized",
    "ParamSelection",
    "select",
    "DEFAULT_MEMORY_BUDGET",
    "get_memory_budget",
    "set_memory_budget",
]
