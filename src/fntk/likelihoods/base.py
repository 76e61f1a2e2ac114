"""The :class:`Likelihood` base class and the shared bases of the named likelihoods (the interface
is stated in :mod:`fntk.likelihoods`: shapes of ``nll``, ``hessian``, ``kl``, ...)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class Likelihood:
    """Base class. Subclasses implement the ``_``-prefixed pure methods on validated tensors."""

    #: Human-readable name used in error messages.
    name: str = "likelihood"
    #: Whether the output Hessian depends on the target (then ``y`` is required).
    hessian_needs_target: bool = False
    #: Whether :meth:`kl` is available (finite-difference and autograd products need it).
    has_kl: bool = True

    # ------------------------------------------------------------------ validation
    def check_num_outputs(self, k: int) -> None:
        """Raise ``ValueError`` if the likelihood cannot take k outputs per point."""

    def check_outputs(self, f: Tensor, name: str = "f") -> Tensor:
        """f: (n, k), or (n,) for one output → (n, k) floating point."""
        if not isinstance(f, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"{name} must be floating point (network outputs), got {f.dtype}")
        if f.dim() == 1:
            f = f[:, None]
        if f.dim() != 2:
            raise ValueError(f"{name} must have shape (n, k) (or (n,) for k = 1), got {tuple(f.shape)}")
        self.check_num_outputs(f.shape[1])
        return f

    def check_target(self, y: Tensor | None, f: Tensor, name: str = "y") -> Tensor | None:
        """Validate y against checked outputs f (n, k); ``None`` is allowed unless needed."""
        if y is None:
            if self.hessian_needs_target:
                raise ValueError(
                    f"{name} is required by the {self.name} likelihood (its Hessian depends on it)"
                )
            return None
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] != f.shape[0]:
            raise ValueError(
                f"{name} must have one target per point (leading {f.shape[0]}), got shape {tuple(y.shape)}"
            )
        return self.check_target_values(y.to(f.device), f, name)

    def check_target_values(self, y: Tensor, f: Tensor, name: str) -> Tensor:
        """Per-likelihood target check (y already has n rows and lives on f's device)."""
        return float_target(y, f, name, self.name)

    def _check_u(self, U: Tensor, f: Tensor, name: str = "U") -> tuple[Tensor, bool]:
        n, k = f.shape
        if not isinstance(U, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(U).__name__}")
        if U.dim() in (2, 3) and tuple(U.shape[:2]) == (n, k):
            U = U.to(device=f.device, dtype=f.dtype)
            return (U[..., None], True) if U.dim() == 2 else (U, False)
        raise ValueError(f"{name} must have shape ({n}, {k}) or ({n}, {k}, r), got {tuple(U.shape)}")

    # ------------------------------------------------------------------ public API
    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        """−log p(y_i | f_i) per example: f (n, k), y (n, ...) → (n,)."""
        f = self.check_outputs(f)
        if y is None:
            raise ValueError(f"y is required to evaluate the {self.name} negative log-likelihood")
        return self.pure_nll(f, self.check_target(y, f))

    def hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Dense output-space Hessians H_i: (n, k, k)."""
        f = self.check_outputs(f)
        return self.pure_hessian(f, self.check_target(y, f))

    def hessian_matmul(self, f: Tensor, U: Tensor, y: Tensor | None = None) -> Tensor:
        """H_i U_i per point: U (n, k, r) → (n, k, r), or (n, k) → (n, k)."""
        f = self.check_outputs(f)
        y = self.check_target(y, f)
        U, single = self._check_u(U, f)
        out = self.pure_hvp(f, U, y)
        return out[..., 0] if single else out

    def hessian_factors(self, f: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(Q (n, k, m), λ (n, m)) with H_i = Q_i diag(λ_i) Q_iᵀ (used for exact diagonals)."""
        f = self.check_outputs(f)
        return self.pure_factors(f, self.check_target(y, f))

    def inverse_link(self, f: Tensor) -> Tensor:
        """The mean of p(y | f): (n, k) → (n, k) (see each class for its meaning)."""
        return self.pure_inverse_link(self.check_outputs(f))

    def kl(self, f_ref: Tensor, f: Tensor) -> Tensor:
        """KL(p(·|f_ref_i) ‖ p(·|f_i)) per example: (n, k), (n, k) → (n,)."""
        f_ref, f = self.check_outputs(f_ref, "f_ref"), self.check_outputs(f)
        if f_ref.shape != f.shape:
            raise ValueError(
                f"f_ref and f must have the same shape, got {tuple(f_ref.shape)} and {tuple(f.shape)}"
            )
        if not self.has_kl:
            raise NotImplementedError(
                f"the {self.name} likelihood has no KL divergence (pass kl= to define one)"
            )
        return self.pure_kl(f_ref, f)

    # ------------------------------------------------------------------ pure parts
    def pure_nll(self, f: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def pure_hvp(self, f: Tensor, U: Tensor, y: Tensor | None) -> Tensor:
        """H U for U (n, k, r) → (n, k, r); default from the dense Hessian."""
        return torch.einsum("nkl,nlr->nkr", self.pure_hessian(f, y), U)

    def pure_hessian(self, f: Tensor, y: Tensor | None) -> Tensor:
        raise NotImplementedError

    def pure_factors(self, f: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        lam, Q = torch.linalg.eigh(self.pure_hessian(f, y))
        return Q, lam

    def pure_terms(self, f: Tensor, y: Tensor, root: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """What a Newton step needs at f (n, k): (nll per point (n,), g = ∂ Σ_i nll_i / ∂f (n, k),
        the Hessian root L (n, k, m) with H_i = L_i L_iᵀ, or None with ``root=False``). By
        default g by autograd and L from :meth:`pure_factors`; closed forms override it."""
        def total(ff: Tensor) -> tuple[Tensor, Tensor]:
            nll = self.pure_nll(ff, y)
            return nll.sum(), nll

        g, (_, nll) = torch.func.grad_and_value(total, has_aux=True)(f)  # one NLL evaluation
        if not root:
            return nll, g, None
        Q, ev = self.pure_factors(f, y)
        return nll, g, Q * ev.clamp_min(0).sqrt()[:, None, :]

    def hessian_operator(self, f: Tensor, y: Tensor | None) -> Callable[[Tensor, slice], Tensor]:
        """(U (m, k, r), s) ↦ H[s] U for the points s of fixed (f, y); may precompute (a dense H)."""
        return lambda U, s: self.pure_hvp(f[s], U, None if y is None else y[s])

    def pure_inverse_link(self, f: Tensor) -> Tensor:
        raise NotImplementedError

    def pure_kl(self, f_ref: Tensor, f: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def float_target(y: Tensor, f: Tensor, name: str, lik: str) -> Tensor:
    """Real-valued targets with the same (n, k) layout as f ((n,) allowed when k = 1)."""
    if not (
        y.is_floating_point() or y.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    ):
        raise TypeError(f"{name} must be a real tensor for the {lik} likelihood, got {y.dtype}")
    y = y.to(f.dtype)
    n, k = f.shape
    if y.dim() == 1 and k == 1:
        y = y[:, None]
    if tuple(y.shape) != (n, k):
        raise ValueError(
            f"{name} must have shape ({n}, {k})" + (f" or ({n},)" if k == 1 else "") + f" for the {lik} "
            f"likelihood with n={n} points and k={k} outputs, got {tuple(y.shape)}"
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return y


def diag_factors(d: Tensor) -> tuple[Tensor, Tensor]:
    """A diagonal Hessian diag(d) (n, k) as factors (I, d)."""
    n, k = d.shape
    return torch.eye(k, dtype=d.dtype, device=d.device).expand(n, k, k), d


class DiagonalHessian(Likelihood):
    """A likelihood whose output Hessian is diagonal, H_i = diag(d_i), with d = :meth:`pure_diag` (n, k).

    H U is then an elementwise scaling and the factors are (I, d), so no (n, k, k) matrix is formed
    except by :meth:`pure_hessian`.
    """

    def pure_diag(self, f: Tensor) -> Tensor:
        """The diagonal d (n, k) of H at outputs f (n, k)."""
        raise NotImplementedError

    def pure_hvp(self, f, U, y):
        return U * self.pure_diag(f)[..., None]

    def pure_hessian(self, f, y):
        return torch.diag_embed(self.pure_diag(f))

    def pure_factors(self, f, y):
        return diag_factors(self.pure_diag(f))


class Elementwise(DiagonalHessian):
    """Independent outputs, y_ij ~ p(· | f_ij), with diagonal H: targets are real, laid out like f
    ((n, k), or (n,) when k = 1), and must lie in [0, ``_high``] (no upper bound when ``None``).
    """

    _high: float | None = None
    #: What the targets must do, for the error message ("{name} must {_range} for the ...").
    _range: str = ""

    def check_target_values(self, y, f, name):
        y = float_target(y, f, name, self.name)
        if bool((y < 0).any()) or (self._high is not None and bool((y > self._high).any())):
            raise ValueError(f"{name} must {self._range} for the {self.name} likelihood")
        return y


__all__ = ["Likelihood", "DiagonalHessian", "Elementwise", "diag_factors", "float_target"]
