r"""Curvature of a linearized network: generalized Gauss-Newton (GGN) / Fisher products.

For data x (n points), a likelihood with output-space curvature H_i (k × k, see
:mod:`fntk.likelihoods`) and the Jacobians J_i = ∂f(x_i; θ)/∂θ|θ̂ (k × p),

    G = s · Σ_i J_iᵀ H_i J_i    (p × p),   s = 1 ("sum") or 1/n ("mean", the paper's scaling).

For exponential families in their natural parameters G is the Fisher information; it is the exact
Hessian of the linearized model's negative log-likelihood Σ_i nll(f_lin(x_i; w), y_i).

:class:`GGNOperator` is a matrix-free linear_operator ``LinearOperator`` with three products:

- ``"exact"``: G V = Jᵀ (H (J V)) per chunk of points, all r columns at once: for networks of
  Linear layers (and norm affines) from layer taps and two GEMMs per layer
  (:mod:`fntk.linearize.tapped`; the taps kept between products when they fit), else by one
  forward per column carrying the tangent and recording the primal (vmap), whichever fntk's cost
  model (:func:`fntk.ntk.costs.ggn_product_seconds`) finds cheaper among the validated paths;
- ``"finite_difference"``: the paper's "scalable Fisher vector product", with the KL divergence of
  the model's predictive distribution from its value at θ̂,

      G v ≈ ∇_θ' Σ_i KL(p(·|f(x_i; θ̂)) ‖ p(·|f(x_i; θ'))) |_{θ' = θ̂ + ε v/‖v‖} · ‖v‖ / ε,

  the KL evaluated in float64 and the gradient taken functionally at θ̂ + εv (nothing is perturbed
  in place). ε is the length of the parameter step (v is normalised, so ε needs no rescaling
  with ‖v‖); the error is O(ε) from the change of J and H along the step;
- ``"autograd"``: the paper's second-order autograd product, the Hessian-vector product (jvp of
  grad) at θ̂ of L(θ) = Σ_i KL(p(·|f̂_i) ‖ p(·|f(x_i; θ))) with f̂ detached: ∇_f L = 0 at θ̂, so
  ∇²L(θ̂) = G exactly. For the categorical likelihood L is the cross-entropy against the detached
  model probabilities (minus a constant entropy), as in the paper.

Both approximate methods need a likelihood with a KL divergence (all the named ones have it).
``diagonal()`` is exact for every method (:mod:`fntk.operators.ggn_diagonal`);
:func:`fntk.linalg.hutchinson_diagonal` estimates it for large p and :func:`fntk.linalg.lanczos_root`
gives top eigenpairs (low-rank posterior covariances and samples).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from fntk import inputs
from fntk.inputs import Inputs
from fntk.likelihoods import Likelihood, resolve
from fntk.linearize import Linearized
from fntk.linearize.tapped import TappedJacobian, tapped_layers
from fntk.linearize.taps import analyze
from fntk.ntk.costs import cheapest, ggn_product_seconds, tapped_product_seconds
from fntk.operators.base import SymmetricWeightOperator, as_columns, from_columns
from fntk.operators.ggn_diagonal import ggn_dense, ggn_diagonal

METHODS = ("exact", "finite_difference", "autograd")
REDUCTIONS = ("sum", "mean")


class GGNOperator(SymmetricWeightOperator):
    r"""G = s Σ_i J_iᵀ H_i J_i as a (p × p) matrix-free, symmetric PSD ``LinearOperator``.

    Args:
        lin: the :class:`~fntk.Linearized` model (defines θ̂ and the p selected parameters).
        x: inputs (n, ...), a dict of tensors (n, ...) each (``model(**x)``), or a re-iterable of
            batches (a ``DataLoader``): then every product, the diagonal and ``to_dense`` go batch by
            batch and sum over the batches (memory: one batch's work and f(x) (n, k); no tapped
            GEMM products, which keep the whole input).
        likelihood: a :class:`~fntk.likelihoods.Likelihood` (gives H_i and the KL), or its name:
            ``"gaussian"`` (σ = 1), ``"heteroscedastic_gaussian"``, ``"categorical"``,
            ``"bernoulli"``, ``"poisson"`` (:func:`fntk.likelihoods.resolve`; an unknown name is
            refused listing the valid ones).
        y: targets (n, ...); optional unless the likelihood's Hessian depends on them
            (:class:`~fntk.likelihoods.GenericLikelihood`).
        method: ``"exact"`` | ``"finite_difference"`` | ``"autograd"`` (see the module docstring).
        reduction: ``"sum"`` (s = 1) or ``"mean"`` (s = 1/n).
        eps: the finite-difference step length ‖θ' − θ̂‖ (default 1e-4, as in the paper).
        logits: the outputs (n, k) at which the H_i are evaluated (default f(x; θ̂)); e.g. the
            linearized logits f_lin(x; w*) = f(x; θ̂) + J(x)(w* − θ̂) for a Laplace approximation of
            the linearized model at its MAP w* (J does not depend on w there). ``"exact"`` only.

    ``G @ V`` takes V (p,) or (p, r) (or batched (*b, p, r)); ``diagonal()`` and ``to_dense()`` are
    exact whatever the method (``to_dense`` forms per-example Jacobians in chunks: p² memory).
    """

    def __init__(
        self,
        lin: Linearized,
        x: Tensor,
        likelihood: Likelihood | str,
        y: Tensor | None = None,
        method: str = "exact",
        reduction: str = "sum",
        eps: float = 1e-4,
        logits: Tensor | None = None,
        _f: Tensor | None = None,
        _checked: bool = False,
        _taps: dict | None = None,
    ):
        if not _checked:
            if not isinstance(lin, Linearized):
                raise TypeError(f"lin must be a fntk.Linearized, got {type(lin).__name__}")
            likelihood = resolve(likelihood)  # a name ("categorical", ...) → its default object
            if method not in METHODS:
                raise ValueError(f"method must be one of {METHODS}, got {method!r}")
            if reduction not in REDUCTIONS:
                raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
            if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
                raise ValueError(f"eps must be a positive float, got {eps!r}")
            if method != "exact" and not likelihood.has_kl:
                raise ValueError(
                    f"method={method!r} needs a likelihood with a KL divergence; the {likelihood.name} "
                    "likelihood has none (pass kl= to GenericLikelihood, or use method='exact')"
                )
            x = inputs.Stream(x, "x") if inputs.is_loader(x) else lin.check_input(x)
            _f = likelihood.check_outputs(lin.forward(x), "model output")
            if logits is not None:
                if method != "exact":
                    raise ValueError(
                        f"logits= (where H is evaluated) needs method='exact'; method={method!r} "
                        "takes H at f(x; θ̂) from KL perturbations of the network itself"
                    )
                if not isinstance(logits, Tensor) or logits.shape != _f.shape:
                    got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                    raise ValueError(f"logits must be a tensor of shape {tuple(_f.shape)} (n, k), got {got}")
                _f = likelihood.check_outputs(logits.detach().to(_f), "logits")
            y = likelihood.check_target(y, _f)
            if method != "exact":  # refuse up front when the model has no path for the products
                lin.second_order_path("hvp" if method == "autograd" else "grad")
        taps = {} if _taps is None else _taps
        super().__init__(
            lin=lin,
            x=x,
            likelihood=likelihood,
            y=y,
            method=method,
            reduction=reduction,
            eps=float(eps),
            _f=_f,
            _checked=True,
            _taps=taps,
        )
        self.lin, self.x, self.likelihood, self.y = lin, x, likelihood, y
        self.method, self.reduction, self.eps = method, reduction, float(eps)
        self.f = _f  # where H is evaluated, f(x; θ̂) unless logits= was given: (n, k)
        n = _f.shape[0]
        self.scale = 1.0 if reduction == "sum" else 1.0 / n
        self._hop = None  # the likelihood's H operator, built on first use
        self._taps = taps  # the tapped products and their kept taps, shared with rebuilt copies

    # ------------------------------------------------------------------ LinearOperator plumbing
    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, shape, vec = as_columns(rhs.to(self.dtype))
        out = getattr(self, "_" + self.method)(cols)
        return from_columns(out * self.scale, shape, vec)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def _diagonal(self) -> Tensor:
        """The exact diagonal (p,), whatever the product method."""
        return self.scale * ggn_diagonal(self.lin, self.x, self.likelihood, self.y, f=self.f)

    def to_dense(self) -> Tensor:
        """The dense (p, p) G from per-example Jacobians, chunked over points."""
        return self.scale * ggn_dense(self.lin, self.x, self.likelihood, self.y, f=self.f)

    def _chunks(self, copies: int) -> Iterator[tuple[Inputs, slice]]:
        """(inputs, rows) of the chunks of points whose ``copies`` tangent copies fit the budget (a
        loader: batch by batch)."""
        lin = self.lin
        return lin.row_chunks(self.x, lin.rows_per_chunk(copies))

    # ------------------------------------------------------------------ products, (p, r) → (p, r)
    def _tapped(self, r: int) -> TappedJacobian | None:
        """The tapped products when they apply and the cost model prefers them for r columns."""
        lin, x = self.lin, self.x
        stream = isinstance(x, inputs.Stream)
        if "tj" in self._taps:
            tj = self._taps["tj"]
        else:  # a loader: the analysis from its first batch; the taps are never kept (streamed)
            first = next(iter(lin.batches(x))) if stream else x
            an = tapped_layers(lin, first)
            tj = self._taps["tj"] = None if an is None else TappedJacobian(lin, first, an, keep=not stream)
        if tj is None:
            return None
        F, n, k = analyze(lin, tj.x).flops, self.f.shape[0], lin.num_outputs
        per = n / tj.x.shape[0]  # tj holds the first batch of a loader
        calls = self._taps["calls"] = self._taps.get("calls", 0) + 1
        shared = calls if tj.keeps() else 1
        options = {
            "tapped": tapped_product_seconds(F, n, k, r, tj.column_flops * per, tj.cached(), 2,
                                             tj.tap_flops * per, shared),
            "autodiff": ggn_product_seconds(F, n, r, lin.slowdown("jvp"), lin.slowdown("vjp")),
        }
        return tj if cheapest(options, "the GGN product") == "tapped" else None

    def _exact(self, V: Tensor) -> Tensor:
        """Σ_chunks J_sᵀ H_s J_s V, all r columns at once: tapped GEMMs (:meth:`_tapped`) or
        :meth:`fntk.Linearized.ggn_block` (by default one forward per column carrying the tangent and
        recording the primal for reverse mode, about 5/3 of a gradient's work per column)."""
        lin = self.lin
        if self._hop is None:
            self._hop = self.likelihood.hessian_operator(self.f, self.y)
        hop = self._hop
        tj = self._tapped(V.shape[1])
        if tj is not None and not isinstance(self.x, inputs.Stream):
            return tj.ggn(V, hop)
        out = torch.zeros_like(V)
        if tj is not None:  # a loader: the tapped GEMMs batch by batch, hop on the global rows
            for xb, s in lin.row_chunks(self.x):
                def shifted(u: Tensor, t: slice, s: slice = s) -> Tensor:
                    return hop(u, slice(s.start + t.start, s.start + t.stop))

                out += TappedJacobian(lin, xb, tj.an, keep=False).ggn(V, shifted)
            return out
        for xs, s in self._chunks(V.shape[1]):
            out += lin.ggn_block(xs, V, lambda u, s=s: hop(u, s))
        return out

    def _kl_of_outputs(self, s: slice):
        """f ↦ Σ_{i∈s} KL(p(·|f̂_i) ‖ p(·|f_i)) in float64, for outputs f (b, k) of the chunk s."""
        f_ref, kl = self.f[s].detach().to(torch.float64), self.likelihood.pure_kl
        return lambda f: kl(f_ref, f.to(torch.float64)).sum()

    def _finite_difference(self, V: Tensor) -> Tensor:
        """∇KL at θ̂ + ε v_j/‖v_j‖, times ‖v_j‖/ε, for each column j (all columns at once)."""
        norms = V.norm(dim=0)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        steps = V * (self.eps / safe)
        out = torch.zeros_like(V)
        for xs, s in self._chunks(2 * V.shape[1]):
            out += self.lin.gradients_at(xs, self._kl_of_outputs(s), steps)
        return out * torch.where(norms > 0, safe / self.eps, torch.zeros_like(norms))

    def _autograd(self, V: Tensor) -> Tensor:
        """∇²L(θ̂) V (by default forward-over-reverse, jvp of grad), all r columns at once."""
        out = torch.zeros_like(V)
        for xs, s in self._chunks(2 * V.shape[1]):
            out += self.lin.hessian_product(xs, self._kl_of_outputs(s), V)
        return out

    def __repr__(self) -> str:
        return (
            f"GGNOperator(p={self.lin.num_params}, n={self.f.shape[0]}, likelihood={self.likelihood!r}, "
            f"method={self.method!r}, reduction={self.reduction!r})"
        )


__all__ = ["GGNOperator", "METHODS", "REDUCTIONS"]
