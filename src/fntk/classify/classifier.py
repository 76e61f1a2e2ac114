r"""Classification with a linearized network: MAP, Laplace and variational inference on f_lin.

:class:`LinearizedClassifier` adapts a pretrained classifier (k logits; one logit = binary) to new
labels without fine-tuning. With n training points, k outputs, p selected parameters:

    logits f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂)  (k,),   y | f ~ Categorical(softmax f)
    (Bernoulli(σ(f)) for k = 1),   prior w ~ N(μ₀, λ⁻¹ I_p), μ₀ = θ̂ ("theta") or 0 ("zero").

The model is linear in w, so the negative log posterior is convex and everything below is exact
up to the stated approximation of each method:

- ``"map"``: w* = argmin Σ_i nll(f_lin(x_i; w), y_i) + (λ/2)‖w − μ₀‖², to ‖∇_w Ψ‖ ≤ ``tol``, by
  damped Newton (``solver="newton"``: exact Hessian Jᵀ H J + λI, Armijo line search; quadratic
  convergence) or by L-BFGS over J·v and Jᵀ·u products with the gradient accumulated over
  mini-batches of ``batch_size`` points (``solver="lbfgs"``: first order, memory bounded by the
  batch); predictive softmax(f_lin(x; w*)).
- ``"laplace"``: q(w) = N(w*, (Jᵀ H(f*) J + λI)⁻¹), H at the linearized logits f* = f_lin(X; w*);
  the predictive logits at x are Gaussian, N(f_lin(x; w*), J(x) Σ J(x)ᵀ), pushed through the
  softmax by the probit approximation softmax(μ_c / √(1 + π/8 Σ_cc)) or by Monte Carlo.
- ``"vi"``: a Gaussian q on a rank-r weight subspace (top singular directions of J(X)) plus the
  prior elsewhere, fitted by maximising the ELBO with the local reparameterization in function
  space (:mod:`fntk.classify.vi`); predictive by Monte Carlo over the Gaussian logits.

``prior_precision="marglik"`` chooses λ by the Laplace evidence (MacKay's fixed point, each step
a warm-started MAP refit); a float fixes it.

Where the computation happens (``space="auto"``): in *function space* when n·k ≤ p (the
representer theorem w* − μ₀ = J(X)ᵀ a/λ: Newton on the (n·k × n·k) empirical NTK, no (p × p)
matrix ever), else in *weight space* (dense J and (p × p) Cholesky when p is small, otherwise
matrix-free Newton-CG and a Lanczos low-rank covariance). See :mod:`fntk.classify`.

The user's model is never modified: :class:`~fntk.Linearized` works on a private eval-mode copy
snapshotted when the classifier is constructed.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fntk import persist
from fntk.classify import meanfield as _mf
from fntk.classify import vi as _vi
from fntk.classify.evidence import MarglikInfo, optimize_prior_precision
from fntk.classify.function_space import FunctionSpace
from fntk.classify.objective import F64, FitInfo, prior_mean_function
from fntk.classify.predictive import glm_predictive
from fntk.classify.weight_space import WeightSpace
from fntk.errors import NotFittedError
from fntk.likelihoods import Bernoulli, Categorical, Likelihood
from fntk.linearize import Linearized, ParamSelection
from fntk.ntk.costs import cheapest, cholesky_seconds
from fntk.validation import check_callback, choice, positive_int

INFERENCES = ("map", "laplace", "vi")
LINK_APPROXES = ("auto", "probit", "mc")
PRIOR_MEANS = ("theta", "zero")
SPACES = ("auto", "function", "weight")
SOLVERS = ("newton", "lbfgs")
COVARIANCES = ("auto", "dense", "lowrank")
VI_FAMILIES = ("subspace", "meanfield")

#: weight space stays dense (explicit J, (p × p) Cholesky) up to this many parameters
DENSE_MAX_PARAMS = 6000


@persist.register("LinearizedClassifier")
class LinearizedClassifier:
    r"""Bayesian transfer of a pretrained classifier through its linearization (see the module doc).

    Args:
        model: a classifier ``nn.Module`` mapping (n, *features) to (n, k) logits (k = 1: one
            binary logit), or a :class:`~fntk.Linearized` (then ``params`` must be ``None``).
        params: which parameters adapt (``None``: all trainable; names; or a predicate
            ``(name, param) -> bool``, e.g. the last layer only); the others stay at θ̂.
        inference: ``"map"`` | ``"laplace"`` | ``"vi"``.
        prior_precision: ``"marglik"`` (λ by the Laplace evidence) or a positive float λ.
        prior_mean: ``"theta"`` (μ₀ = θ̂) or ``"zero"`` (μ₀ = 0, as the paper's code).
        link_approx: ``"probit"`` | ``"mc"`` | ``"auto"`` (probit for Laplace, MC for VI).
        space: ``"auto"`` | ``"function"`` | ``"weight"`` (see the module doc).
        covariance: weight space only: ``"dense"`` (p × p), ``"lowrank"`` (Lanczos, rank ``rank``,
            matrix-free), or ``"auto"`` (dense for p ≤ 6000 when J fits the memory budget).
        rank: Lanczos rank of the low-rank Laplace covariance.
        num_samples: Monte Carlo samples of the predictive (``link_approx="mc"``).
        vi_rank, vi_samples, vi_max_iter: VI subspace dimension r, fixed function-space samples
            per training point, L-BFGS iterations.
        vi_init: ``"laplace"`` (start q at the Laplace approximation: in the subspace, or the
            diagonal Laplace at the MAP for mean-field) or ``"prior"``.
        vi_family: ``"subspace"`` (full-covariance q on the rank-``vi_rank`` subspace, the prior
            elsewhere) or ``"meanfield"`` (diagonal q(w) = N(m, diag(s²)) on all p weights;
            :mod:`fntk.classify.meanfield`).
        solver: the MAP solver, ``"newton"`` (default) or ``"lbfgs"`` (weight space only).
        batch_size: points per mini-batch of the L-BFGS objective and gradient (``None``: as many
            as the memory budget allows per product).
        tol: MAP convergence, ‖∇_w Ψ‖ ≤ tol (absolute; reachable in float64 internal algebra).
        max_iter: Newton steps (default 100) or L-BFGS iterations (default 2000) per MAP solve.
        seed: seeds the Monte Carlo draws (predictive and VI).
        memory_budget: bytes per batched product (passed to :class:`~fntk.Linearized`).

    Attributes (after ``fit``): ``space_``, ``prior_precision_`` (λ), ``converged_``, ``n_iter_``,
    ``grad_norm_`` (‖∇_w Ψ‖ at the MAP), ``num_classes_``, ``marglik_history_`` [(λ, log Z, d log Z/d log λ)],
    ``elbo_history_`` and ``elbo_`` (VI), ``fit_seconds_``.
    """

    def __init__(
        self,
        model: nn.Module | Linearized,
        params: ParamSelection = None,
        inference: str = "laplace",
        prior_precision: str | float = "marglik",
        prior_mean: str = "theta",
        link_approx: str = "auto",
        *,
        space: str = "auto",
        covariance: str = "auto",
        rank: int = 100,
        num_samples: int = 100,
        vi_rank: int = 128,
        vi_samples: int = 64,
        vi_max_iter: int = 300,
        vi_init: str = "laplace",
        vi_family: str = "subspace",
        solver: str = "newton",
        batch_size: int | None = None,
        tol: float = 1e-6,
        max_iter: int | None = None,
        seed: int = 0,
        memory_budget: int | None = None,
    ):
        self.inference = choice("inference", inference, INFERENCES)
        bad_prior = ValueError(
            f"prior_precision must be 'marglik' or a positive float, got {prior_precision!r}"
        )
        if isinstance(prior_precision, str):
            if prior_precision != "marglik":
                raise bad_prior
        elif (
            isinstance(prior_precision, bool)
            or not isinstance(prior_precision, (int, float))
            or not (math.isfinite(prior_precision) and prior_precision > 0)
        ):
            raise bad_prior
        self.prior_precision = prior_precision
        self.prior_mean = choice("prior_mean", prior_mean, PRIOR_MEANS)
        self.link_approx = choice("link_approx", link_approx, LINK_APPROXES)
        self.space = choice("space", space, SPACES)
        self.covariance = choice("covariance", covariance, COVARIANCES)
        self.vi_init = choice("vi_init", vi_init, ("laplace", "prior"))
        self.vi_family = choice("vi_family", vi_family, VI_FAMILIES)
        self.rank = positive_int("rank", rank)
        self.num_samples = positive_int("num_samples", num_samples)
        self.vi_rank = positive_int("vi_rank", vi_rank)
        self.vi_samples = positive_int("vi_samples", vi_samples)
        self.vi_max_iter = positive_int("vi_max_iter", vi_max_iter)
        self.solver = choice("solver", solver, SOLVERS)
        if self.solver == "lbfgs" and self.space == "function":
            raise ValueError(
                "solver='lbfgs' optimises the weights w (weight space); use space='weight' or 'auto' "
                "with it, or solver='newton' for space='function'"
            )
        self.batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        if max_iter is None:
            max_iter = 100 if self.solver == "newton" else 2000
        self.max_iter = positive_int("max_iter", max_iter)
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a positive float, got {tol!r}")
        self.tol, self.seed = float(tol), int(seed)
        if isinstance(model, Linearized):
            if params is not None:
                raise ValueError("params must be None when model is already a fntk.Linearized")
            self.lin = model
        elif isinstance(model, nn.Module):
            self.lin = Linearized(model, params, memory_budget=memory_budget)
        else:
            raise TypeError(f"model must be a torch.nn.Module or fntk.Linearized, got {type(model).__name__}")
        self._backend: FunctionSpace | WeightSpace | None = None

    # ------------------------------------------------------------------ checks
    def _check_labels(self, y: Any, n: int, k: int) -> Tensor:
        if not isinstance(y, Tensor):
            try:
                y = torch.as_tensor(y)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"y must be a tensor of int class labels, got {type(y).__name__}") from err
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(
                f"y must hold integer class labels (int64), got dtype {y.dtype}; convert whole-number "
                "labels with y.long()"
            )
        if y.dim() != 1:
            raise ValueError(f"y must be a 1-d tensor of n class labels, got shape {tuple(y.shape)}")
        if y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} labels but x has {n} points; expected y of shape ({n},)")
        C = max(k, 2)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= C:
            raise ValueError(
                f"y has labels outside [0, {C}) (min {lo}, max {hi}); the model has k={k} output"
                f"{'s' if k > 1 else ''}, so labels must be in 0..{C - 1}"
            )
        return y.to(self.lin.device).long()

    def _require_fit(self) -> FunctionSpace | WeightSpace:
        if self._backend is None:
            raise NotFittedError(
                "this LinearizedClassifier is not fitted yet: call fit(x, y) before predict_proba/predict"
            )
        return self._backend

    # ------------------------------------------------------------------ fit
    def _choose(self, n: int, k: int) -> tuple[str, bool]:
        p, nk, budget = self.lin.num_params, n * k, self.lin.memory_budget
        fits_K = 4 * nk * nk * 8 <= 4 * budget
        space = self.space
        if space == "auto":  # one (n·k)³ or p³ factorisation per Newton step dominates either space
            options = {"function": cholesky_seconds(nk) if fits_K and self.solver == "newton" else math.inf,
                       "weight": cholesky_seconds(p)}
            space = cheapest(options, "the classifier's space")
        if self.covariance == "auto":
            dense = p <= DENSE_MAX_PARAMS and nk * p * 8 <= budget
        else:
            dense = self.covariance == "dense"
        return space, dense

    def fit(
        self, x: Tensor, y: Tensor, callback: Callable[[dict], None] | None = None
    ) -> LinearizedClassifier:
        """Fit on inputs x (n, *features) and int labels y (n,) in [0, C); returns self.

        C = k classes for k ≥ 2 logits (categorical likelihood), C = 2 for one logit (Bernoulli).
        ``callback``, if given, is called once per iteration of every MAP solve with a dict
        ``{"stage": "map", "step", "objective", "grad_norm"}`` (objective Ψ(w), ‖∇_w Ψ‖) and, for
        ``inference="vi"``, once per ELBO iteration with ``{"stage": "vi", "step", "objective",
        "elbo"}`` (objective = −ELBO); it may raise (e.g. KeyboardInterrupt) to stop the fit, which
        leaves the classifier unfitted and the model untouched.
        """
        callback = check_callback(callback)
        t0 = time.perf_counter()
        x = self.lin.check_input(x)
        n, k = x.shape[0], self.lin.num_outputs
        y = self._check_labels(y, n, k)
        self.likelihood_: Likelihood = Categorical() if k >= 2 else Bernoulli()
        self._y = y if k >= 2 else y.to(F64)[:, None]
        self.num_classes_ = max(k, 2)
        mu0 = None
        if self.prior_mean == "zero":
            mu0 = torch.zeros(self.lin.num_params, dtype=F64, device=self.lin.device)
        space, dense = self._choose(n, k)
        if space == "function":
            backend: FunctionSpace | WeightSpace = FunctionSpace(self.lin, x, self._y, self.likelihood_, mu0)
        else:
            backend = WeightSpace(
                self.lin,
                x,
                self._y,
                self.likelihood_,
                mu0,
                dense=dense,
                rank=self.rank,
                solver=self.solver,
                batch_size=self.batch_size,
            )
        backend.callback = callback
        self.space_ = space if space == "function" else ("weight-dense" if dense else "weight-lowrank")
        if self.prior_precision == "marglik":
            lam, info, ml = optimize_prior_precision(backend, self.tol, self.max_iter)
        else:
            lam, ml = float(self.prior_precision), MarglikInfo()
            info = backend.fit(lam, self.tol, self.max_iter)
        backend.callback = None  # not kept with the fitted state
        self._backend = None  # fitted only once every stage has finished
        self._set_map_info(lam, info, ml)
        if self.inference == "vi":
            self._fit_vi(backend, x, callback)
        self._backend = backend
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _set_map_info(self, lam: float, info: FitInfo, ml: MarglikInfo) -> None:
        self.prior_precision_ = lam
        self.converged_, self.n_iter_, self.grad_norm_ = info.converged, info.n_iter, info.grad_norm
        self.map_history_ = info.history
        self.marglik_history_ = ml.history
        if not info.converged:
            why = (
                f"max_iter={self.max_iter} reached"
                if info.n_iter >= self.max_iter
                else "the objective no longer decreases at this precision"
            )
            warnings.warn(
                f"MAP solve stopped after {info.n_iter} {self.solver} iterations with "
                f"‖∇Ψ‖ = {info.grad_norm:.3g} > tol = {self.tol:g} ({why})",
                RuntimeWarning,
                stacklevel=3,
            )

    def _fit_vi(
        self, b: FunctionSpace | WeightSpace, x: Tensor, callback: Callable[[dict], None] | None
    ) -> None:
        lam = self.prior_precision_
        opts = {"num_samples": self.vi_samples, "max_iter": self.vi_max_iter, "seed": self.seed}
        if self.vi_family == "meanfield":
            mu0 = self.lin.theta.to(F64)
            if self.prior_mean == "zero":
                mu0 = torch.zeros_like(mu0)
            jac: list = []  # J(x), formed once when it fits the budget
            if self.vi_init == "laplace":
                m = b.weights()
                s = _mf.diagonal_laplace_scale(self.lin, x, self._y, self.likelihood_, m, lam, jac)
            else:
                m, s = mu0.clone(), torch.full_like(mu0, lam**-0.5)
            res = _mf.fit_meanfield(
                self.lin, x, self._y, self.likelihood_, mu0, lam, m, s, callback=callback, cache=jac, **opts
            )
            self.vi_rank_ = self.lin.num_params
        else:
            Phi, u_map = b.subspace(self.vi_rank)
            m0 = b.m0 if isinstance(b, FunctionSpace) else prior_mean_function(self.lin, x, b.mu0_arg)
            mu_init = C_init = None
            if self.vi_init == "laplace":
                mu_init, C_init = _vi.laplace_init(self.likelihood_, self._y, m0, Phi, lam, u_map)
            res = _vi.fit_vi(
                self.likelihood_, self._y, m0, Phi, lam, mu_init, C_init, callback=callback, **opts
            )
            self.vi_rank_ = int(Phi.shape[2])
        self._vi = res
        self.elbo_history_, self.elbo_ = res.elbo_history, res.elbo
        self.vi_converged_ = res.converged

    # ------------------------------------------------------------------ results
    def weights(self) -> Tensor:
        """The posterior mean of w (p,): the MAP (map, laplace) or the variational mean (vi)."""
        b = self._require_fit()
        if self.inference == "vi":
            w = self._vi.mean if self.vi_family == "meanfield" else b.subspace_weights(self._vi.mean)
            return w.to(self.lin.dtype)
        return b.weights().to(self.lin.dtype)

    def log_marginal_likelihood(self) -> float:
        """The Laplace evidence log Z(λ) ≈ −Ψ(w*) − ½ log det(I + G/λ) at the fitted λ."""
        return float(self._require_fit().log_evidence())

    def predict_f(self, x: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor | None]:
        """The predictive distribution of the logits at x (m, *features): mean (m, k) and
        covariance (m, k, k) (``None`` for ``inference="map"``), in the model's dtype."""
        b = self._require_fit()
        x = self.lin.check_input(x)
        if self.inference == "vi" and self.vi_family == "meanfield":
            mean, cov = _mf.predictive_meanfield(self.lin, x, self._vi.mean, self._vi.scale)
        elif self.inference == "vi":
            m0s, Phis, Kss = b.subspace_test(x)
            mean, cov = _vi.predictive(m0s, Phis, Kss, self._vi.mean, self._vi.scale, self.prior_precision_)
        else:
            mean, cov = b.predict(x, covariance=self.inference == "laplace", chunk=chunk)
        dt = self.lin.dtype
        return mean.to(dt), (None if cov is None else cov.to(dt))

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (m, C) at x (m, *features): the GLM predictive E[softmax(f)] with
        f ~ N(mean, cov) by the probit approximation or Monte Carlo (the plug-in softmax for MAP)."""
        mean, cov = self.predict_f(x)
        link = self.link_approx
        if link == "auto":
            link = "mc" if self.inference == "vi" else "probit"
        return glm_predictive(mean, cov, link, self.num_samples, self.seed).to(self.lin.dtype)

    def predict(self, x: Tensor) -> Tensor:
        """The most probable class (m,) int64."""
        return self.predict_proba(x).argmax(-1)

    def save(self, path: str) -> None:
        """Write the fitted classifier to ``path`` (tensors + JSON metadata; see :mod:`fntk.persist`).
        Reload with ``fntk.load(path, model)`` and the same, unchanged, model."""
        persist.save(self, path)

    def __repr__(self) -> str:
        lam = getattr(self, "prior_precision_", self.prior_precision)
        return (
            f"LinearizedClassifier(inference={self.inference!r}, p={self.lin.num_params}, "
            f"prior_precision={lam!r}, space={getattr(self, 'space_', self.space)!r})"
        )


__all__ = ["LinearizedClassifier", "NotFittedError", "INFERENCES"]
