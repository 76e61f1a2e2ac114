"""The linearization of a trained network around its weights.

``Linearized`` holds a snapshot θ̂ of (a selection of) a model's parameters and evaluates, purely
functionally (``torch.func.functional_call``), the network f(x; θ̂), its Jacobian-vector products
J(x)v, vector-Jacobian products J(x)ᵀu, the explicit Jacobian and the linear model

    f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂).

Shapes: n points, k outputs (the network's output flattened per point), p selected parameters,
r right-hand sides. Parameter vectors are flat (p,) in ``named_parameters()`` order.

The user's module is never touched: we work on a private deep copy put in eval mode (BatchNorm
uses running statistics, Dropout is off), whose tensors are passed explicitly to
``functional_call``. Parameters, buffers, train/eval flags, ``requires_grad``, ``.grad`` and hooks
of the user's model stay exactly as they were, whatever happens inside a call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fntk import distributed
from fntk.linearize import engine
from fntk.linearize.selection import ParamSelection, select
from fntk.settings import get_memory_budget


def _uses_embedding(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())


class Linearized:
    """First-order Taylor expansion of ``model`` in its (selected) parameters at their current value.

    Args:
        model: any ``nn.Module`` mapping a batch x of shape (n, *feature_shape) to outputs of shape
            (n, *out_shape); the outputs are flattened to (n, k).
        params: which parameters are linearized (the others stay fixed at their value): ``None``
            for all with ``requires_grad``; an iterable of names from ``model.named_parameters()``;
            or a predicate ``(name, param) -> bool``.
        memory_budget: bytes of working memory one batched call may use (default: the module-wide
            setting, 2 GiB). Large n or r are split into chunks that fit.
    """

    def __init__(self, model: nn.Module, params: ParamSelection = None, memory_budget: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.names = select(model, params)
        if memory_budget is not None and not (isinstance(memory_budget, int) and memory_budget > 0):
            raise ValueError(f"memory_budget must be a positive int of bytes, got {memory_budget!r}")
        self._budget = memory_budget
        # A private copy in eval mode: the user's module (flags, hooks, grads) is never used again.
        self._module = copy.deepcopy(model).eval()
        self._module.requires_grad_(False)
        named_p = dict(self._module.named_parameters())
        sel = set(self.names)
        self._theta = {n: named_p[n].detach() for n in self.names}
        self._fixed = {n: p.detach() for n, p in named_p.items() if n not in sel}
        self._fixed.update({n: b.detach() for n, b in self._module.named_buffers()})
        first = self._theta[self.names[0]]
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.shapes = [self._theta[n].shape for n in self.names]
        self.numels = [self._theta[n].numel() for n in self.names]
        self.num_params: int = sum(self.numels)
        self._int_inputs = _uses_embedding(model)
        self._k: int | None = None
        self._feature_shape: tuple[int, ...] | None = None
        self._act_per_example: int | None = None

    # ------------------------------------------------------------------ basics
    @property
    def memory_budget(self) -> int:
        return self._budget if self._budget is not None else get_memory_budget()

    @property
    def theta(self) -> Tensor:
        """θ̂ as a flat (p,) tensor (a copy)."""
        return torch.cat([self._theta[n].reshape(-1) for n in self.names])

    @property
    def num_outputs(self) -> int:
        """k, the number of outputs per point (known after the first call on data)."""
        if self._k is None:
            raise RuntimeError("num_outputs is found from a first forward: call forward(x) once first")
        return self._k

    @property
    def module(self) -> nn.Module:
        """The private eval-mode copy of the model (do not modify it)."""
        return self._module

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Split a flat (..., p) vector into a dict of per-parameter (..., *shape) views."""
        lead = v.shape[:-1]
        parts = torch.split(v, self.numels, dim=-1)
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, parts, self.shapes)}

    def flatten(self, d: dict[str, Tensor], lead: int = 0) -> Tensor:
        """Inverse of :meth:`unflatten`: a dict of (*lead, *shape) tensors to a flat (*lead, p)."""
        return torch.cat([d[n].reshape(*d[n].shape[:lead], -1) for n in self.names], dim=-1)

    def theta_dict(self) -> dict[str, Tensor]:
        """The selected parameters θ̂ as a name → tensor dict (shared storage, do not modify)."""
        return dict(self._theta)

    def fixed_dict(self) -> dict[str, Tensor]:
        """The unselected parameters and the buffers (name → tensor; shared storage, do not modify)."""
        return dict(self._fixed)

    def function(self, x: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
        """The pure map θ (dict of the selected parameters) ↦ f(x; θ) as an (n, k) tensor."""
        return engine.model_function(self._module, self._fixed, x)

    def per_example_jacobian(
        self, names: list[str] | None = None, output: int | None = None, split: bool = False
    ) -> Callable[[Tensor], Tensor | list[Tensor]]:
        """x (b, ...) ↦ per-example Jacobian rows (b, k', p_sub) of the selected parameters ``names``
        (all when None, in :attr:`names` order) for all k outputs or (k' = 1) one ``output``; with
        ``split`` a list of per-parameter blocks. Inputs must be checked. See :mod:`.engine`."""
        chosen = self.names if names is None else [n for n in self.names if n in set(names)]
        return engine.per_example_jacobian(
            self._module, self._fixed, self._theta, chosen, self.num_outputs, output, split
        )

    # ------------------------------------------------------------------ checks
    def check_input(self, x: Tensor, name: str = "x") -> Tensor:
        """Validate x (n, *feature_shape) and move it to the model's device/dtype (floats only)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"{name} must have a leading batch axis (n, ...), got a scalar")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty: got shape {tuple(x.shape)}, expected at least one point")
        if x.is_floating_point() or x.is_complex():
            x = x.to(device=self.device, dtype=self.dtype)
            bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name} contains NaN or Inf (first at index {i})")
        elif x.dtype == torch.bool or not self._int_inputs:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the model is a {self.dtype} model without an "
                "Embedding layer; pass floating-point inputs"
            )
        else:
            x = x.to(self.device)
        if self._feature_shape is not None and tuple(x.shape[1:]) != self._feature_shape:
            raise ValueError(
                f"{name} has feature shape {tuple(x.shape[1:])} (full shape {tuple(x.shape)}), expected "
                f"(n, {', '.join(map(str, self._feature_shape))}) as in earlier calls"
            )
        if self._feature_shape is None:
            self._probe(x, name)
        distributed.check_same(x, name)
        return x

    def _probe(self, x: Tensor, name: str) -> None:
        """One forward on a single point: finds k, the activation size, and rejects bad shapes early."""
        counts: list[int] = []

        def hook(_m, _i, out):
            if isinstance(out, Tensor):
                counts.append(out.numel())

        handles = [m.register_forward_hook(hook) for m in self._module.modules()]
        try:
            with torch.no_grad():
                out = self.function(x[:1])(self._theta)
        except (RuntimeError, IndexError) as err:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} does not fit the model: the forward pass failed with "
                f"{type(err).__name__}: {str(err).splitlines()[0]}"
            ) from err
        finally:
            for h in handles:  # hooks live on our private copy, and are removed again
                h.remove()
        self._k = int(out.shape[1])
        self._feature_shape = tuple(x.shape[1:])
        self._act_per_example = max(int(sum(counts)), self._k, 1)

    def _check_vec(self, v: Tensor, name: str = "v") -> tuple[Tensor, bool]:
        """v: (p,) or (p, r) → (p, r), and whether it was a single vector."""
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(
                f"{name} must have shape ({self.num_params},) or ({self.num_params}, r) for the "
                f"{self.num_params} selected parameters, got {tuple(v.shape)}"
            )
        if not v.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {v.dtype}")
        v = v.to(device=self.device, dtype=self.dtype)
        return (v[:, None], True) if v.dim() == 1 else (v, False)

    def _check_cotangent(self, u: Tensor, n: int, name: str = "u") -> tuple[Tensor, bool]:
        """u: (n, k) | (n, k, r), or (n,) | (n, r) when k == 1 → (n, k, r), and single-vector flag."""
        k = self.num_outputs
        if not isinstance(u, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(u).__name__}")
        if not u.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {u.dtype}")
        u = u.to(device=self.device, dtype=self.dtype)
        if u.dim() >= 1 and u.shape[0] == n:
            if u.dim() == 2 and u.shape[1] == k:
                return u[..., None], True
            if u.dim() == 3 and u.shape[1] == k:
                return u, False
            if k == 1 and u.dim() == 1:
                return u[:, None, None], True
            if k == 1 and u.dim() == 2:
                return u[:, None, :], False
        raise ValueError(
            f"{name} must have shape ({n}, {k}) or ({n}, {k}, r) for n={n} points and k={k} outputs"
            + (f" (or ({n},) / ({n}, r) since k == 1)" if k == 1 else "")
            + f", got {tuple(u.shape)}"
        )

    # ------------------------------------------------------------------ chunking
    @property
    def activation_numel(self) -> int:
        """Numbers in the outputs of all modules for one point (measured on the first probe; ≥ k)."""
        return self._act_per_example or 1

    def rows_per_chunk(self, r: int, extra_per_row: int = 0) -> int:
        """How many points fit the memory budget when each carries r tangent/cotangent copies.

        The working set of a batched product is about (1 + r) copies of the activations, plus
        ``extra_per_row`` elements per point (e.g. Jacobian rows); a factor 3 covers autodiff's
        saved tensors.
        """
        act = self.activation_numel
        per_row = (3 * act * (1 + r) + extra_per_row) * torch.finfo(self.dtype).bits // 8
        return max(1, self.memory_budget // max(per_row, 1))

    @staticmethod
    def chunks(n: int, size: int) -> list[slice]:
        """Consecutive slices of ≤ size rows covering range(n)."""
        size = max(1, int(size))
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    # ------------------------------------------------------------------ maps
    def forward(self, x: Tensor) -> Tensor:
        """f(x; θ̂): (n, k)."""
        x = self.check_input(x)
        size = self.rows_per_chunk(0)

        def rows(xs: Tensor) -> Tensor:
            with torch.no_grad():
                return torch.cat([self.function(xs[s])(self._theta) for s in self.chunks(xs.shape[0], size)])

        return self._by_rank(rows, x)

    def _by_rank(self, fn: Callable[..., Tensor], x: Tensor, *row_args: Tensor) -> Tensor:
        """fn(x, *row_args) on all rows; under torch.distributed each rank does its shard of the
        rows and the row blocks are all-gathered."""
        if not distributed.is_active():
            return fn(x, *row_args)
        n, s = x.shape[0], distributed.shard(x.shape[0])
        if s.stop > s.start:
            local = fn(x[s], *(a[s] for a in row_args))
        else:  # more ranks than rows: an empty block of the right trailing shape
            local = fn(x[:1], *(a[:1] for a in row_args))[:0]
        return distributed.gather_rows(local, n)

    def jvp_block(self, x: Tensor, V: Tensor) -> Tensor:
        """J(x) V for checked x and V (p, r) → (n, k, r), unchunked: one forward, tangents vmapped."""
        return engine.jvp_columns(self.function(x), self._theta, self.unflatten(V.T))

    def vjp_block(self, x: Tensor, U: Tensor) -> Tensor:
        """J(x)ᵀ U for checked x and U (n, k, r) → (p, r), unchunked: one vjp closure, vmapped."""
        return self.flatten(engine.vjp_columns(self.function(x), self._theta, U), lead=1).T

    def jvp_mat(self, x: Tensor, V: Tensor) -> Tensor:
        """J(x) V on checked inputs: V (p, r) → (n, k, r), chunked over points to the budget."""
        size = self.rows_per_chunk(V.shape[1])

        def rows(xs: Tensor) -> Tensor:
            return torch.cat([self.jvp_block(xs[s], V) for s in self.chunks(xs.shape[0], size)])

        return self._by_rank(rows, x)

    def vjp_mat(self, x: Tensor, U: Tensor) -> Tensor:
        """J(x)ᵀ U on checked inputs: U (n, k, r) → (p, r), chunked over points and summed
        (under torch.distributed: over this rank's rows, then all-reduced)."""
        size = self.rows_per_chunk(U.shape[2])
        rows = distributed.shard(x.shape[0]) if distributed.is_active() else slice(0, x.shape[0])
        out = U.new_zeros(self.num_params, U.shape[2])
        for s in self.chunks(rows.stop - rows.start, size):
            s = slice(s.start + rows.start, s.stop + rows.start)
            out = out + self.vjp_block(x[s], U[s])
        return distributed.all_reduce_sum(out) if distributed.is_active() else out

    def jvp(self, x: Tensor, v: Tensor) -> Tensor:
        """J(x) v. x: (n, ...); v: (p,) → (n, k), or (p, r) → (n, k, r)."""
        x = self.check_input(x)
        V, single = self._check_vec(v)
        out = self.jvp_mat(x, V)
        return out[..., 0] if single else out

    def vjp(self, x: Tensor, u: Tensor) -> Tensor:
        """J(x)ᵀ u. x: (n, ...); u: (n, k) → (p,), or (n, k, r) → (p, r) ((n,), (n, r) when k = 1)."""
        x = self.check_input(x)
        U, single = self._check_cotangent(u, x.shape[0])
        out = self.vjp_mat(x, U)
        return out[:, 0] if single else out

    def jacobian(self, x: Tensor) -> Tensor:
        """The explicit Jacobian J(x): (n, k, p), computed in chunks of points that fit the budget.

        Per-example reverse mode (vmap over points of jacrev on a one-point batch): one batched
        forward and k batched backward passes per chunk. Points never interact in eval mode.
        """
        return self.jacobian_mat(self.check_input(x))

    def jacobian_mat(self, x: Tensor, output: int | None = None) -> Tensor:
        """J(x) on checked inputs: (n, k, p), or (n, p) for a single ``output``."""
        k = self.num_outputs if output is None else 1
        size = self.rows_per_chunk(k, extra_per_row=2 * k * self.num_params)
        per_point = self.per_example_jacobian(None, output)

        def rows(xs: Tensor) -> Tensor:
            J = torch.cat([per_point(xs[s]) for s in self.chunks(xs.shape[0], size)])
            return J if output is None else J[:, 0]

        return self._by_rank(rows, x)

    def __call__(self, x: Tensor, w: Tensor) -> Tensor:
        """f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂). x: (n, ...); w: (p,) → (n, k)."""
        x = self.check_input(x)
        if not isinstance(w, Tensor) or w.shape != (self.num_params,):
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"w must have shape ({self.num_params},), got {got}")
        return self.forward(x) + self.jvp(x, w.to(self.dtype) - self.theta)

    def __repr__(self) -> str:
        return (
            f"Linearized({type(self._module).__name__}, p={self.num_params}, "
            f"k={self._k if self._k is not None else '?'}, dtype={self.dtype})"
        )


__all__ = ["Linearized"]
