"""The linearization of a trained network and the one autodiff engine every computation uses.

- :class:`Linearized`: θ̂ snapshot, parameter and output selection, f, J·v, Jᵀ·u, per-example
  Jacobians, GGN products (:mod:`.second_order`), ``capabilities``.
- :mod:`.engine`: the pure ``torch.func`` maps behind it; :mod:`.fallbacks`: the exact paths for
  models on which a fast transform fails or is wrong; :mod:`.probes`: the checks that choose.
- :mod:`.taps`: layer taps (layer inputs and output gradients) for the structured kernels and
  GGN diagonals.
- :mod:`.private`: the private copy of the model (no user hooks) and the model checks;
  :mod:`.scope`: the torch settings fntk's calls run under; :mod:`.outputs`: output selection.
"""

from fntk.linearize.accept import as_linearized
from fntk.linearize.linearized import Linearized
from fntk.linearize.outputs import default_output
from fntk.linearize.probes import Capabilities
from fntk.linearize.selection import ParamSelection, select
from fntk.settings import DEFAULT_MEMORY_BUDGET, get_memory_budget, set_memory_budget

__all__ = [
    "Linearized",
    "as_linearized",
    "Capabilities",
    "default_output",
    "ParamSelection",
    "select",
    "DEFAULT_MEMORY_BUDGET",
    "get_memory_budget",
    "set_memory_budget",
]
