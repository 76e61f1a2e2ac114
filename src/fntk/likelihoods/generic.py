""":class:`GenericLikelihood`: a likelihood from a user's per-example NLL, its Hessian by autodiff
(re-exported by :mod:`fntk.likelihoods`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import hessian, vmap

from fntk.likelihoods.base import Likelihood


class GenericLikelihood(Likelihood):
    r"""A likelihood from any per-example NLL ``nll(f_i (k,), y_i) -> scalar``.

    H_i = ∇²_f nll(f_i, y_i) by ``torch.func.hessian`` (forward-over-reverse), vmapped over the
    n points; so ``nll`` must be a pure torch function that works under ``torch.func`` (no
    ``.item()``, no in-place updates of its arguments). H may be indefinite away from a minimum.
    The target is required; y (n, ...) is split along its first axis.

    Args:
        nll: per-example negative log-likelihood.
        num_outputs: the required k, or ``None`` for any.
        inverse_link: map (n, k) → (n, ·) for the predictive mean (default identity).
        kl: optional per-example ``kl(f_ref_i, f_i) -> scalar``; enables the finite-difference
            and autograd products.
        name: used in error messages.
    """

    hessian_needs_target = True

    def __init__(
        self,
        nll: Callable[[Tensor, Tensor], Tensor],
        num_outputs: int | None = None,
        inverse_link: Callable[[Tensor], Tensor] | None = None,
        kl: Callable[[Tensor, Tensor], Tensor] | None = None,
        name: str = "generic",
    ):
        if not callable(nll):
            raise TypeError(f"nll must be callable (f_i, y_i) -> scalar, got {type(nll).__name__}")
        if num_outputs is not None and not (isinstance(num_outputs, int) and num_outputs > 0):
            raise ValueError(f"num_outputs must be a positive int or None, got {num_outputs!r}")
        self._nll_fn, self._link, self._kl_fn = nll, inverse_link, kl
        self.num_outputs, self.name = num_outputs, name
        self.has_kl = kl is not None
        self._vnll = vmap(nll)
        self._vhess = vmap(hessian(nll))
        self._vkl = vmap(kl) if kl is not None else None

    def check_num_outputs(self, k: int) -> None:
        if self.num_outputs is not None and k != self.num_outputs:
            raise ValueError(f"the {self.name} likelihood expects k={self.num_outputs} outputs, got k={k}")

    def check_target_values(self, y, f, name):
        return y.to(f.dtype) if y.is_floating_point() else y

    def pure_nll(self, f, y):
        out = self._vnll(f, y)
        if out.shape != (f.shape[0],):
            raise ValueError(
                f"the {self.name} nll must return a scalar per example, got shape {tuple(out.shape[1:])}"
            )
        return out

    def pure_hessian(self, f, y):
        return self._vhess(f, y)

    def hessian_operator(self, f, y):
        H = self._vhess(f, y)  # (n, k, k), computed once per operator
        return lambda U, s: torch.einsum("nkl,nlr->nkr", H[s], U)

    def pure_inverse_link(self, f):
        return f if self._link is None else self._link(f)

    def pure_kl(self, f_ref, f):
        return self._vkl(f_ref, f)

    def __repr__(self):
        return f"GenericLikelihood(name={self.name!r}, num_outputs={self.num_outputs})"
