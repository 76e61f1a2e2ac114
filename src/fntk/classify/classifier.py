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
a warm-started MAP refit); ``"cv"`` by K-fold cross-validation of the held-out NLL of the chosen
inference's own predictive over a λ grid, then one refit on all labels (:mod:`fntk.classify.cv`);
a float fixes it.

Where the computation happens (``space="auto"``): in *function space* when n·k ≤ p (the
representer theorem w* − μ₀ = J(X)ᵀ a/λ: Newton on the (n·k × n·k) empirical NTK, no (p × p)
matrix ever), else in *weight space* (dense J and (p × p) Cholesky when p is small, otherwise
matrix-free Newton-CG and a Lanczos low-rank covariance). See :mod:`fntk.classify`.

The user's model is never modified: :class:`~fntk.Linearized` works on a private eval-mode copy
snapshotted when the classifier is constructed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from fntk import inputs, persist, validation
from fntk.classify import cost, fitting, posterior
from fntk.classify import cv as _cv
from fntk.classify.predictive import glm_predictive, sample_logits
from fntk.errors import NotFittedError
from fntk.linearize import Linearized, ParamSelection, as_linearized
from fntk.linearize.outputs import OutputFn
from fntk.validation import check_callback, choice, positive_int

INFERENCES = ("map", "laplace", "vi")
LINK_APPROXES = ("auto", "probit", "mc")
PRIOR_MEANS = ("theta", "zero")
SPACES = ("auto", "function", "weight")
SOLVERS = ("newton", "lbfgs")
COVARIANCES = ("auto", "dense", "lowrank")
VI_FAMILIES = ("subspace", "meanfield")
DENSE_MAX_PARAMS = cost.DENSE_MAX_PARAMS
Backend = fitting.Backend
#: default ``time_limit``: fits the cost model estimates above one hour are refused
DEFAULT_TIME_LIMIT = 3600.0
#: attributes of objects saved before they existed (set on load)
_DEFAULTS = {"time_limit": DEFAULT_TIME_LIMIT, "progress": False, "cv_folds": _cv.DEFAULT_FOLDS,
             "cv_grid": _cv.DEFAULT_GRID}


@persist.register("LinearizedClassifier")
class LinearizedClassifier:
    r"""Bayesian transfer of a pretrained classifier through its linearization (see the module doc).

    Args:
        model: a classifier ``nn.Module`` mapping (n, *features) to (n, k) logits (k = 1: one
            binary logit), or a :class:`~fntk.Linearized` (then ``params`` must be ``None``).
        params: which parameters adapt (``None``: all trainable; names; or a predicate
            ``(name, param) -> bool``, e.g. the last layer only); the others stay at θ̂.
        inference: ``"map"`` | ``"laplace"`` | ``"vi"``.
        prior_precision: ``"marglik"`` (λ by the Laplace evidence), ``"cv"`` (λ by ``cv_folds``-fold
            cross-validation of the held-out NLL over ``cv_grid``, then a refit on all labels; every
            class needs at least ``cv_folds`` labels) or a positive float λ.
        prior_mean: ``"theta"`` (μ₀ = θ̂) or ``"zero"`` (μ₀ = 0, as the paper's code).
        link_approx: ``"probit"`` | ``"mc"`` | ``"auto"`` (probit for Laplace, MC for VI).
        space: ``"auto"`` | ``"function"`` | ``"weight"`` (see the module doc). Under ``"auto"`` a
            selection that is a final ``nn.Linear`` on fixed features (e.g. ``params`` = the last
            layer) takes the exact Kronecker backend (:mod:`fntk.classify.last_layer`;
            ``space_ == "last-layer"``) with Newton, unless ``covariance="lowrank"``.
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
        seed: seeds the Monte Carlo draws (predictive and VI): an int ≥ 0.
        memory_budget: bytes per batched product (passed to :class:`~fntk.Linearized`); the dense
            matrices of an explicit ``space="function"`` or ``covariance="dense"`` are checked
            against it before they are formed (:class:`~fntk.NTKMemoryError`).
        time_limit: seconds; a fit the cost model (:mod:`fntk.classify.cost`) estimates above it
            is refused before any heavy work (:class:`~fntk.TimeLimitError`). Default one hour;
            ``None`` lifts the limit.
        progress: show a tqdm bar (stderr) over the MAP and VI iterations of ``fit``.
        output_fn: maps the model's output (tuple, dict, ModelOutput) to the (n, k) logits, as in
            :class:`~fntk.Linearized` (default: a tensor as is, a dict's "logits").

    A fit that raises or is interrupted (KeyboardInterrupt from ``callback``, in the MAP, evidence
    or VI stage) leaves the classifier exactly as it was before the call. Calls on one classifier
    from several threads are serialised by a per-object lock. A float16/bfloat16 model is
    linearized through a float32 copy of its weights (results in float32).

    Attributes (after ``fit``): ``space_``, ``prior_precision_`` (λ), ``cv_history_`` ([(λ, mean
    held-out NLL)] with ``prior_precision="cv"``), ``converged_``, ``n_iter_``,
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
        time_limit: float | None = DEFAULT_TIME_LIMIT,
        progress: bool = False,
        output_fn: OutputFn | None = None,
        cv_folds: int = _cv.DEFAULT_FOLDS,
        cv_grid: Sequence[float] | None = None,
    ):
        self.inference = choice("inference", inference, INFERENCES)
        bad_prior = ValueError(
            f"prior_precision must be 'marglik', 'cv' or a positive float, got {prior_precision!r}"
        )
        if isinstance(prior_precision, str):
            if prior_precision not in ("marglik", "cv"):
                raise bad_prior
        elif (
            isinstance(prior_precision, bool)
            or not isinstance(prior_precision, (int, float))
            or not (math.isfinite(prior_precision) and prior_precision > 0)
        ):
            raise bad_prior
        self.prior_precision = prior_precision
        self.cv_folds = positive_int("cv_folds", cv_folds, 2)
        self.cv_grid = _cv.check_grid(cv_grid)
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
        self.tol = validation.real("tol", tol, positive=True)
        self.seed = validation.seed("seed", seed)
        memory_budget = validation.byte_count("memory_budget", memory_budget)
        self.time_limit = validation.seconds_limit("time_limit", time_limit)
        self.progress = validation.flag("progress", progress)
        lin = as_linearized(model, params, memory_budget, output_fn)
        self._model_dtype = lin.dtype
        self.lin = persist.working_linearization(lin)  # float32 copy of a float16/bfloat16 model
        self._backend: Backend | None = None
        self._lock = threading.RLock()

    def __fntk_state__(self) -> dict:
        """What a saved adapter stores: everything but the lock."""
        return {k: v for k, v in vars(self).items() if k != "_lock"}

    def __fntk_restore__(self) -> None:
        """After loading: a new lock, and the defaults of options added since the file was written."""
        self._lock = threading.RLock()
        for k, v in {**_DEFAULTS, "_model_dtype": self.lin.dtype}.items():
            self.__dict__.setdefault(k, v)

    # ------------------------------------------------------------------ checks
    def _require_fit(self) -> Backend:
        if self._backend is None:
            raise NotFittedError(
                "this LinearizedClassifier is not fitted yet: call fit(x, y) before predict_proba/predict"
            )
        return self._backend

    # ------------------------------------------------------------------ fit
    def fit(
        self, x: Tensor | dict | Iterable, y: Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
    ) -> LinearizedClassifier:
        """Fit on inputs x (n, *features) and int labels y (n,) in [0, C); returns self.

        x may be a dict of tensors batched along axis 0 (the model is called as ``model(**x)``), or
        a re-iterable of (x_b, y_b) batches (a ``DataLoader``; then y is None): its batches are
        validated one by one and the inputs and labels collected in memory (no Jacobian is
        stored; weight-space products still go chunk by chunk to the memory budget).

        C = k classes for k ≥ 2 logits (categorical likelihood), C = 2 for one logit (Bernoulli).
        Before any heavy work the dense matrices are checked against the memory budget and the
        estimated time against ``time_limit``. ``callback``, if given, is called once per
        iteration of every MAP solve with a dict ``{"stage": "map", "step", "objective",
        "grad_norm"}`` (objective Ψ(w), ‖∇_w Ψ‖) and, for ``inference="vi"``, once per ELBO
        iteration with ``{"stage": "vi", "step", "objective", "elbo"}`` (objective = −ELBO); it
        may raise (e.g. KeyboardInterrupt) to stop the fit. A fit that raises, for this or any
        other reason, leaves the classifier exactly as it was (fitted or not) and the model
        untouched.
        """
        callback = check_callback(callback)
        x, y = inputs.fit_data(x, y)
        with self._lock, validation.transaction(self):
            with validation.progress(callback, self.progress, "LinearizedClassifier.fit") as cb:
                self._fit(x, y, cb)
        return self

    def _fit(self, x: Tensor, y: Tensor, callback: Callable[[dict], None] | None) -> None:
        fitting.fit(self, x, y, callback)


    # ------------------------------------------------------------------ results
    def weights(self) -> Tensor:
        """The posterior mean of w (p,): the MAP (map, laplace) or the variational mean (vi)."""
        with self._lock:
            b = self._require_fit()
            if self.inference == "vi":
                w = self._vi.mean if self.vi_family == "meanfield" else b.subspace_weights(self._vi.mean)
                return w.to(self.lin.dtype)
            return b.weights().to(self.lin.dtype)

    def log_marginal_likelihood(self) -> float:
        """The Laplace evidence log Z(λ) ≈ −Ψ(w*) − ½ log det(I + G/λ) at the fitted λ."""
        with self._lock:
            return float(self._require_fit().log_evidence())

    def predict_f(self, x: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor | None]:
        """The predictive distribution of the logits at x (m, *features): mean (m, k) and
        covariance (m, k, k) (``None`` for ``inference="map"``), in the model's dtype.

        Test points are processed in chunks of at most ``chunk`` (a positive int), fewer when
        their Jacobian or kernel rows would exceed the memory budget. A re-iterable of batches
        (``DataLoader``; targets in the batches are ignored) goes batch by batch (a tqdm bar over
        the batches with ``progress=True``), the results concatenated."""
        chunk = positive_int("chunk", chunk)
        if inputs.is_loader(x):
            with self._lock:
                self._require_fit()  # before the first batch is read
            bar = validation.progress_bar(self.lin.batches(x), self.progress, "LinearizedClassifier.predict",
                                          inputs.num_batches(x))
            parts = [self.predict_f(xb, chunk) for xb in bar]
            covs = None if parts[0][1] is None else torch.cat([c for _, c in parts])
            return torch.cat([m for m, _ in parts]), covs
        with self._lock:
            b = self._require_fit()
            x = self.lin.check_input(x)
            rows = cost.predict_rows(self.lin, b, self.inference, self.vi_family, x.shape[0], chunk)
            parts = [posterior.logits_block(self, b, x[s]) for s in self.lin.chunks(x.shape[0], rows)]
        mean = torch.cat([m for m, _ in parts])
        cov = None if parts[0][1] is None else torch.cat([c for _, c in parts])
        dt = self.lin.dtype
        return mean.to(dt), (None if cov is None else cov.to(dt))

    def predict_f_joint(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        r"""The *joint* predictive distribution of the logits at m test points x (m, *features):
        mean (m, k) and covariance (m·k × m·k), in the model's dtype (``None`` for
        ``inference="map"``, as :meth:`predict_f`).

        Layout (point-major, as fntk's function-space vectors and :class:`~fntk.NTKOperator`): row
        i·k + c is logit c at point i, so ``cov.reshape(m, k, m, k)[i, c, j, e]`` = Cov[f_c(x_i),
        f_e(x_j)], and the (k × k) diagonal blocks are :meth:`predict_f`'s covariances. Laplace:
        J(x) Σ J(x)ᵀ with Σ = (Jᵀ H(f*) J + λI)⁻¹ (low-rank Laplace: its Lanczos root plus the
        prior elsewhere); VI: J(x) Σ_q J(x)ᵀ for the variational q(w) = N(m, Σ_q) (subspace: q on the
        subspace, the prior outside it; mean-field: Σ_q = diag(s²)). The logits are linear in w, so
        these Gaussians are exact under each posterior. The (m·k)² matrix is checked against the
        memory budget before it is formed (:class:`~fntk.NTKMemoryError`)."""
        with self._lock:
            b = self._require_fit()
            x = self.lin.check_input(x)
            mean, cov = posterior.logits_joint(self, b, x)
        dt = self.lin.dtype
        return mean.to(dt), (None if cov is None else cov.to(dt))

    def sample(
        self, x: Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Joint functional samples of the logits f(x) at m test points x (m, *features) from the
        posterior: (num_samples, m, k), in the model's dtype.

        f_s = μ + A ε_s with (μ, Σ = A Aᵀ) = :meth:`predict_f_joint` (Laplace: N(f_lin(x; w*),
        J Σ Jᵀ); VI: the variational posterior pushed through the linear logits), A the
        eigendecomposition root (Σ may be singular, e.g. more test logits than parameters) and
        ε_s ~ N(0, I_{m·k}) drawn with ``generator`` (a ``torch.Generator``; ``None``: torch's
        default generator, as :meth:`fntk.gp.NTKPosterior.sample`) as ``torch.randn(m·k,
        num_samples)``; the samples are joint across the test points, as the regressor's. The
        classes: softmax (or the sigmoid for one logit) of each sample.

        ``inference="map"`` is refused (ValueError): it has no posterior over the logits (every
        sample would be :meth:`predict_f`'s mean); NTKRegressor and laplace-torch sample only from
        a posterior too.
        """
        num_samples = positive_int("num_samples", num_samples)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if self.inference == "map":
            raise ValueError(
                "sample: inference='map' is a point estimate with no posterior over the logits (every "
                "sample would equal predict_f(x)[0]); use inference='laplace' or 'vi' to sample"
            )
        with self._lock:
            b = self._require_fit()
            x = self.lin.check_input(x)
            mean, cov = posterior.logits_joint(self, b, x)
        return sample_logits(mean, cov, num_samples, generator).to(self.lin.dtype)

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
        with self._lock:
            persist.save(self, path)

    def __repr__(self) -> str:
        lam = getattr(self, "prior_precision_", self.prior_precision)
        return (
            f"LinearizedClassifier(inference={self.inference!r}, p={self.lin.num_params}, "
            f"prior_precision={lam!r}, space={getattr(self, 'space_', self.space)!r})"
        )


__all__ = ["LinearizedClassifier", "NotFittedError", "INFERENCES"]
