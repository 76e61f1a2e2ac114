"""The linearization of a trained network around its weights.

``Linearized`` holds a snapshot θ̂ of (a selection of) a model's parameters and evaluates, purely
functionally (``torch.func.functional_call``), the network f(x; θ̂), its Jacobian-vector products
J(x)v, vector-Jacobian products J(x)ᵀu, the explicit Jacobian and the linear model

    f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂).

Shapes: n points, k outputs (the selected output flattened per point), p selected parameters,
r right-hand sides. Parameter vectors are flat (p,) in ``named_parameters()`` order.

Inputs x are a tensor (n, ...) (the model is called as ``model(x)``), a dict of tensors batched along
axis 0 (``model(**x)``, Hugging Face style; integer entries such as token ids and masks are passed
unchanged), or a re-iterable of such batches (a ``DataLoader``, see :mod:`fntk.inputs`): ``forward``,
``jvp``, ``vjp``, ``jacobian`` and ``lin(x, w)`` then go batch by batch (outputs concatenated, Jᵀu
summed); :meth:`check_input` collects the batches for callers that need all points at once.

The user's module is never touched: we work on a private deep copy without the user's hooks
(:mod:`.private`), in eval mode (BatchNorm uses running statistics, Dropout is off), whose tensors
are passed explicitly to ``functional_call``. On the first call with data, capability probes
(:mod:`.probes`) decide which autodiff path each product takes (:attr:`Linearized.capabilities`);
every call runs under fntk's torch settings (:mod:`.scope`) and holds the object's lock, so one
``Linearized`` may be shared by threads (their calls on it run one at a time).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from fntk import distributed, inputs
from fntk.inputs import Inputs
from fntk.linearize import checks, engine, fallbacks, probes, scope, second_order, streaming
from fntk.linearize.outputs import OutputFn, check_output_fn
from fntk.linearize.private import check_model, frozen_rows, private_copy, uses_embedding
from fntk.linearize.selection import ParamSelection, select
from fntk.settings import get_memory_budget

#: cost of a validated path relative to the fast one (per pass), for the planners; measured in
#: benchmarks/RESULTS.md ("Capability probes and fallbacks")
SLOWDOWN = {
    "jvp": {"forward": 1.0, "double_vjp": 1.5},  # "rows": k' backward passes per point, see slowdown
    "vjp": {"vmap": 1.0, "loop": 1.0},  # measured 0.6-0.8: r plain backward passes are not slower
    "rows": {"nested_vmap": 1.0, "cotangent_vmap": 2.5, "loop": 3.0},
}


class Linearized:
    """First-order Taylor expansion of ``model`` in its (selected) parameters at their current value.

    Args:
        model: any ``nn.Module`` mapping a batch x of shape (n, *feature_shape) to outputs whose
            selected tensor has shape (n, *out_shape); it is flattened to (n, k). Points must not
            interact (checked).
        params: which parameters are linearized (the others stay fixed at their value): ``None``
            for all with ``requires_grad``; an iterable of names from ``model.named_parameters()``;
            or a predicate ``(name, param) -> bool``.
        memory_budget: bytes of working memory one batched call may use (default: the module-wide
            setting, 2 GiB). Large n or r are split into chunks that fit.
        output_fn: maps the model's output to the tensor (n, ...) that is linearized (a pure torch
            function; see :mod:`fntk.linearize.outputs`). Default: a tensor as it is, a dict or
            ``ModelOutput`` → its ``"logits"``; tuples need an ``output_fn``.

    Raises (when built): ValueError/TypeError for NaN/Inf or complex parameters or buffers and
    for ``nn.Embedding(max_norm=...)``; on the first call with data, ValueError for a model whose
    points interact, whose output is not real floating point, or that autograd cannot
    differentiate (see :mod:`fntk.linearize.probes`).
    """

    def __init__(self, model: nn.Module, params: ParamSelection = None, memory_budget: int | None = None,
                 output_fn: OutputFn | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.names = select(model, params)
        if memory_budget is not None and not (isinstance(memory_budget, int) and memory_budget > 0):
            raise ValueError(f"memory_budget must be a positive int of bytes, got {memory_budget!r}")
        self._budget = memory_budget
        self.output_fn = check_output_fn(output_fn)
        check_model(model)
        self._module = private_copy(model)  # the user's module (flags, hooks, grads) is never used again
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
        frozen, self._no_forward = frozen_rows(self._module, self.names, self.shapes)
        self._keep = None if frozen is None else (~frozen).to(self.dtype)
        self._int_inputs = uses_embedding(model)
        self._k: int | None = None
        self._feature_shape: tuple[int, ...] | None = None
        self._act_per_example: int | None = None
        self._caps: probes.Capabilities | None = None
        self._probe_x: Tensor | None = None
        self._lock = threading.RLock()

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
        """The private eval-mode copy of the model, without user hooks (do not modify it)."""
        return self._module

    @property
    def capabilities(self) -> probes.Capabilities:
        """Which autodiff path each product takes, as validated by the probes on the first call
        with data (see :class:`fntk.linearize.probes.Capabilities`)."""
        if self._caps is None:
            raise RuntimeError("capabilities are probed on the first call with data: call forward(x) first")
        return self._caps

    def slowdown(self, what: str) -> float:
        """Cost per pass of the validated path for ``what`` ("jvp", "vjp", "rows") relative to the
        fast path (1.0 when the fast path is validated); J V from rows costs k' backward passes."""
        mode = getattr(self.capabilities, what)
        if what == "jvp" and mode == "rows":
            return (1 + 2 * self.num_outputs) * SLOWDOWN["rows"][self.capabilities.rows] / 2
        return SLOWDOWN[what][mode]

    @contextlib.contextmanager
    def _session(self, grad: bool = True) -> Iterator[None]:
        """The lock on the private module and fntk's torch settings, for one call. Autodiff calls
        run with grad mode on even inside ``torch.no_grad()``: modules choose their kernels by it
        (float32 LSTMs take mkldnn, which saves no workspace for a backward without grad mode),
        and the probes validated the paths with it on."""
        with self._lock, scope.evaluation_scope(), torch.set_grad_enabled(grad):
            yield

    def with_dtype(self, dtype: torch.dtype) -> Linearized:
        """The same linearization in another floating dtype: a converted copy of the private module
        (hook-based reparametrizations included), with the same parameter selection, memory budget
        and ``output_fn``; probed afresh on its first call."""
        with self._lock:
            module = private_copy(self._module).to(dtype)
        return Linearized(module, self.names, memory_budget=self._budget, output_fn=self.output_fn)

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Split a flat (..., p) vector into a dict of per-parameter (..., *shape) views."""
        return engine.unflatten(v, self.names, self.shapes)

    def flatten(self, d: dict[str, Tensor], lead: int = 0) -> Tensor:
        """Inverse of :meth:`unflatten`: a dict of (*lead, *shape) tensors to a flat (*lead, p)."""
        return engine.flatten(d, self.names, lead)

    def theta_dict(self) -> dict[str, Tensor]:
        """The selected parameters θ̂ as a name → tensor dict (shared storage, do not modify)."""
        return dict(self._theta)

    def fixed_dict(self) -> dict[str, Tensor]:
        """The unselected parameters and the buffers (name → tensor; shared storage, do not modify)."""
        return dict(self._fixed)

    def function(self, x: Inputs) -> Callable[[dict[str, Tensor]], Tensor]:
        """The pure map θ (dict of the selected parameters) ↦ f(x; θ) as an (n, k) tensor. It uses the
        private module: call it only inside this object's methods (they hold its lock)."""
        return engine.model_function(self._module, self._fixed, x, self.output_fn)

    def _project(self, V: Tensor) -> Tensor:
        """V (p, r) with the autograd-frozen entries (padding rows of embeddings) zeroed: the input
        of every forward-mode product, so that forward mode follows autograd's convention."""
        return V if self._keep is None else V * self._keep[:, None]

    def _target(self) -> probes.Target:
        return probes.Target(self._module, self._fixed, self._theta, self.names, self.shapes,
                             self.output_fn, self._keep, self._no_forward)

    def per_example_jacobian(
        self, names: list[str] | None = None, output: int | None = None, split: bool = False
    ) -> Callable[[Tensor], Tensor | list[Tensor]]:
        """x (b, ...) ↦ per-example Jacobian rows (b, k', p_sub) of the selected parameters ``names``
        (all when None, in :attr:`names` order) for all k outputs or (k' = 1) one ``output``; with
        ``split`` a list of per-parameter blocks. Inputs must be checked; the path is the probed
        ``capabilities.rows`` (see :mod:`.engine`)."""
        chosen = self.names if names is None else [n for n in self.names if n in set(names)]
        kk = self.num_outputs if output is None else 1
        item = torch.finfo(self.dtype).bits // 8
        points = fallbacks.BASIS_POINTS  # cotangent basis: b·k' copies of a chunk of b points
        act = self.activation_numel
        while points > 1 and 3 * act * (1 + points * kk) * points * item > self.memory_budget:
            points //= 2
        run = engine.per_example_jacobian(self._module, self._fixed, self._theta, chosen, self.num_outputs,
                                          output, split, self.capabilities.rows, self.output_fn, points)

        def locked(x: Inputs) -> Tensor | list[Tensor]:
            with self._session():
                return run(x)

        return locked

    # ------------------------------------------------------------------ checks and probes
    def check_input(self, x: Inputs | Iterable, name: str = "x") -> Inputs:
        """x checked and on the model's device and dtype (see :func:`.streaming.check_input`); a
        loader is collected. The first call runs the capability probes."""
        return streaming.check_input(self, x, name)

    def batches(self, x: Inputs | Iterable, name: str = "x") -> Iterator[Inputs]:
        """The checked inputs batch by batch (see :func:`.streaming.batches`)."""
        return streaming.batches(self, x, name)

    def row_chunks(self, x: Inputs | Iterable, size: int | None = None) -> Iterator[tuple[Inputs, slice]]:
        """(inputs, rows) in chunks of ≤ ``size`` points, across a loader's batches (see
        :func:`.streaming.row_chunks`)."""
        return streaming.row_chunks(self, x, size)

    def _check_vec(self, v: Tensor, name: str = "v") -> tuple[Tensor, bool]:
        return checks.check_vec(v, self.num_params, self.dtype, self.device, name)

    def _check_cotangent(self, u: Tensor, n: int, name: str = "u") -> tuple[Tensor, bool]:
        return checks.check_cotangent(u, n, self.num_outputs, self.dtype, self.device, name)

    # ------------------------------------------------------------------ chunking
    @property
    def activation_numel(self) -> int:
        """Numbers in the outputs of all modules for one point (measured on the first probe; ≥ k)."""
        return self._act_per_example or 1

    def rows_per_chunk(self, r: int, extra_per_row: int = 0) -> int:
        """Points per chunk with r tangent/cotangent copies each (see :func:`.streaming.rows_per_chunk`)."""
        return streaming.rows_per_chunk(self, r, extra_per_row)

    chunks = staticmethod(streaming.chunks)

    # ------------------------------------------------------------------ maps
    def forward(self, x: Inputs | Iterable) -> Tensor:
        """f(x; θ̂): (n, k); batch by batch (concatenated) for a loader."""
        if inputs.is_loader(x):
            return torch.cat([self.forward(xb) for xb in self.batches(x)])
        return streaming.by_rank(lambda xs: streaming.forward_outputs(self, xs), self.check_input(x))

    def jvp_block(self, x: Inputs, V: Tensor) -> Tensor:
        """J(x) V for checked x and V (p, r) → (n, k, r), unchunked (one forward with the tangents
        vmapped, or the probed fallback)."""
        mode = self.capabilities.jvp
        if mode == "rows":
            return torch.einsum("nkp,pr->nkr", self.per_example_jacobian()(x), V)
        if mode == "forward":
            V = self._project(V)
        with self._session():
            return engine.jvp_columns(self.function(x), self._theta, self.unflatten(V.T), mode)

    def vjp_block(self, x: Inputs, U: Tensor) -> Tensor:
        """J(x)ᵀ U for checked x and U (n, k, r) → (p, r), unchunked (one vjp closure, vmapped)."""
        with self._session():
            cols = engine.vjp_columns(self.function(x), self._theta, U, self.capabilities.vjp)
        return self.flatten(cols, lead=1).T

    def _jvp_rows(self, r: int) -> int:
        k = self.num_outputs
        if self.capabilities.jvp == "rows":
            return self.rows_per_chunk(k, extra_per_row=2 * k * self.num_params)
        return self.rows_per_chunk(r)

    def jvp_mat(self, x: Inputs, V: Tensor) -> Tensor:
        """J(x) V on checked inputs: V (p, r) → (n, k, r), chunked over points to the budget."""
        size = self._jvp_rows(V.shape[1])

        def rows(xs: Tensor) -> Tensor:
            return torch.cat([self.jvp_block(xs[s], V) for s in self.chunks(xs.shape[0], size)])

        return streaming.by_rank(rows, x)

    def vjp_mat(self, x: Inputs, U: Tensor) -> Tensor:
        """J(x)ᵀ U on checked inputs: U (n, k, r) → (p, r), chunked over points and summed
        (under torch.distributed: over this rank's rows, then all-reduced)."""
        size = self.rows_per_chunk(U.shape[2])
        rows = distributed.shard(x.shape[0]) if distributed.is_active() else slice(0, x.shape[0])
        out = U.new_zeros(self.num_params, U.shape[2])
        for s in self.chunks(rows.stop - rows.start, size):
            s = slice(s.start + rows.start, s.stop + rows.start)
            out = out + self.vjp_block(x[s], U[s])
        return distributed.all_reduce_sum(out) if distributed.is_active() else out

    def jvp(self, x: Inputs | Iterable, v: Tensor) -> Tensor:
        """J(x) v. x: (n, ...); v: (p,) → (n, k), or (p, r) → (n, k, r) (a loader: by batch, concatenated)."""
        if inputs.is_loader(x):
            return torch.cat([self.jvp(xb, v) for xb in self.batches(x)])
        x = self.check_input(x)
        V, single = self._check_vec(v)
        out = self.jvp_mat(x, V)
        return out[..., 0] if single else out

    def vjp(self, x: Inputs | Iterable, u: Tensor) -> Tensor:
        """J(x)ᵀ u. x: (n, ...); u: (n, k) → (p,), or (n, k, r) → (p, r) ((n,), (n, r) when k = 1).
        For a loader, Σ_b J(x_b)ᵀ u_b with u_b the rows of u of batch b (u has the loader's n rows)."""
        if inputs.is_loader(x):
            return streaming.vjp_batches(self, x, u)
        x = self.check_input(x)
        U, single = self._check_cotangent(u, x.shape[0])
        out = self.vjp_mat(x, U)
        return out[:, 0] if single else out

    def jacobian(self, x: Inputs | Iterable) -> Tensor:
        """The explicit Jacobian J(x): (n, k, p), computed in chunks of points that fit the budget
        (a loader: batch by batch, concatenated).

        Per-example reverse mode (by default vmap over points of jacrev on a one-point batch: one
        batched forward and k batched backward passes per chunk; see ``capabilities.rows``).
        Raises NTKMemoryError before allocating when n·k·p numbers exceed the memory budget (for a
        loader: before the batch that would exceed it).
        """
        if not inputs.is_loader(x):
            return self.jacobian_mat(self.check_input(x))
        return streaming.jacobian_batches(self, x)

    def jacobian_mat(self, x: Inputs, output: int | None = None) -> Tensor:
        """J(x) on checked inputs: (n, k, p), or (n, p) for a single ``output``."""
        k = self.num_outputs if output is None else 1
        streaming.check_jacobian_size(self, x.shape[0], k)
        size = self.rows_per_chunk(k, extra_per_row=2 * k * self.num_params)
        per_point = self.per_example_jacobian(None, output)

        def rows(xs: Tensor) -> Tensor:
            J = torch.cat([per_point(xs[s]) for s in self.chunks(xs.shape[0], size)])
            return J if output is None else J[:, 0]

        return streaming.by_rank(rows, x)

    # ------------------------------------------------------------------ second order (GGN products)
    def second_order_path(self, what: str) -> str:
        """The probed path for "ggn", "hvp" or "grad" (see :class:`~fntk.linearize.Capabilities`);
        ValueError, naming the failing operation, when the model has none. Needs a first call."""
        return second_order.path(self, what)

    def ggn_block(self, x: Inputs, V: Tensor, hop: Callable[[Tensor], Tensor]) -> Tensor:
        """J(x)ᵀ hop(J(x) V) (p, r) for checked x, V (p, r), hop (n, k, r) → (n, k, r); unchunked."""
        return second_order.ggn_product(self, x, V, hop)

    def gradients_at(self, x: Inputs, loss_of_f: Callable[[Tensor], Tensor], S: Tensor) -> Tensor:
        """[∇_θ loss_of_f(f(x; θ̂ + s_j))]_j (p, r) for parameter steps S (p, r); unchunked."""
        return second_order.gradients_at(self, x, loss_of_f, S)

    def hessian_product(self, x: Inputs, loss_of_f: Callable[[Tensor], Tensor], V: Tensor) -> Tensor:
        """∇²_θ loss_of_f(f(x; θ)) at θ̂ times V (p, r); unchunked."""
        return second_order.hessian_product(self, x, loss_of_f, V)

    def __call__(self, x: Inputs | Iterable, w: Tensor) -> Tensor:
        """f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂). x: (n, ...); w: (p,) → (n, k) (a loader: by batch)."""
        if inputs.is_loader(x):
            return torch.cat([self(xb, w) for xb in self.batches(x)])
        x = self.check_input(x)
        if not isinstance(w, Tensor) or w.shape != (self.num_params,):
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"w must have shape ({self.num_params},), got {got}")
        return self.forward(x) + self.jvp(x, w.to(self.dtype) - self.theta)

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) get their own lock
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"Linearized({type(self._module).__name__}, p={self.num_params}, "
            f"k={self._k if self._k is not None else '?'}, dtype={self.dtype})"
        )


__all__ = ["Linearized"]
