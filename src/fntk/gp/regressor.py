r"""NTK Gaussian-process regression: adapt a trained network to a new regression task exactly.

Model (for the selected output c of the network, n training points X, targets y):

    y = m(x) + g(x) + ε,   g ~ GP(0, s·J_c(x)J_c(x')ᵀ),   ε ~ N(0, σ²),
    m(x) = f_c(x; θ̂) + b   (mean="network")   or   m(x) = b   (mean="constant", the paper's code),

i.e. the Bayesian linear model f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂) with prior w − θ̂ ~ N(0, s·I).
The kernel scale s, noise σ² and constant b maximise the exact log marginal likelihood
log N(y | m(X), s·J Jᵀ + σ²I). Internally y − f_c(X) is standardised; all reported quantities
(predictions, hyperparameters, marginal likelihood) are in the original units.

Function space works with the n × n kernel, weight space with the p × p matrix JᵀJ (push-through
identity; determinant lemma for the marginal likelihood); both are exact and agree. See
:mod:`fntk.gp.dense` for the maths and :mod:`fntk.gp.plan` for the automatic choice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fntk import persist, validation
from fntk.errors import NotFittedError
from fntk.gp import dense, iterative, plan
from fntk.gp.hyper import F64, Hyper, observe, optimize
from fntk.gp.posterior import NTKPosterior
from fntk.gp.targets import check_targets, standardise
from fntk.linearize import Linearized, ParamSelection, as_linearized
from fntk.linearize.outputs import OutputFn
from fntk.ntk import NTKMethod
from fntk.validation import Callback, check_callback

MEANS = ("network", "constant")
HYPERPARAMETERS = ("scale", "noise", "constant")
DEFAULT_NOISE = 0.1  # standardised units: a tenth of the residual variance
#: default ``time_limit``: fits the planner estimates above one hour are refused
DEFAULT_TIME_LIMIT = 3600.0
#: attributes of objects saved before they existed (restored on load)
_DEFAULTS = {"time_limit": DEFAULT_TIME_LIMIT, "progress": False}


def _learn(optimize: object) -> frozenset[str]:
    if isinstance(optimize, bool):
        return frozenset(HYPERPARAMETERS) if optimize else frozenset()
    if isinstance(optimize, str):  # one name, not its letters
        optimize = (optimize,)
    if not isinstance(optimize, Iterable):
        raise TypeError(
            f"optimize must be True, False or an iterable of names from {HYPERPARAMETERS}, got {optimize!r}"
        )
    learn = frozenset(optimize)
    unknown = sorted(map(str, learn - set(HYPERPARAMETERS)))
    if unknown:
        raise ValueError(f"optimize: unknown hyperparameter(s) {unknown}; valid: {HYPERPARAMETERS}")
    return learn


@persist.register("NTKRegressor")
class NTKRegressor:
    r"""Exact GP regression with the empirical NTK of a trained network (its linearization).

    Args:
        model: the trained ``nn.Module`` (never modified), or a :class:`~fntk.Linearized`. A
            float16/bfloat16 model is linearized through a float32 copy of its weights
            (:func:`fntk.persist.working_linearization`); all GP algebra is float64.
        params: which parameters are linearized (see :class:`~fntk.Linearized`); None: all trainable.
        output: the network output whose Jacobian defines the kernel (e.g. 0, the mean of a
            heteroscedastic (mean, raw variance) net); ``None`` fits k independent GPs, one per
            output, sharing the Jacobian work (y then has shape (n, k)).
        space: ``"auto"`` | ``"function"`` (n × n kernel) | ``"weight"`` (p × p, push-through).
        noise: observation noise variance σ² (initial value when it is learned).
        optimize: learn the hyperparameters by maximising the marginal likelihood: True (all of
            scale, noise, constant), False (keep the given/default values) or an iterable naming
            the ones to learn, e.g. ``("scale", "constant")``. A learned noise stays above
            1e-6 × the variance of the residual y − f_c(x) (a jitter floor).
        method: how the dense kernel is computed, passed to ``fntk.ntk``: an ``fntk.NTKMethod``
            or its name ("auto", "structured", "contraction", "products").
        mean: ``"network"`` (f_c(x; θ̂) + b) or ``"constant"`` (b only).
        scale: kernel scale s (the prior variance of w − θ̂); initial value when learned.
        constant: the constant b of the prior mean; initial value when learned.
        solver: ``"auto"`` | ``"direct"`` (dense Cholesky/eigh) | ``"iterative"`` (matrix-free
            preconditioned CG + Lanczos).
        solver_options: dict for the iterative solver: ``cg_tolerance`` (relative residual, default
            1e-6 in float64, 1e-4 in float32), ``max_cg_iterations`` (1000), ``lanczos_iterations``
            (R = 100: rank of the Lanczos root and Krylov dimension of the quadrature),
            ``num_probes`` (8, for the stochastic log-determinant), ``seed`` (0).
        memory_limit: bytes that a dense n × n or p × p factorisation may use (default: half the
            available RAM); beyond it "auto" goes matrix-free, and an explicit
            ``solver="direct"`` is refused (:class:`~fntk.NTKMemoryError`).
        time_limit: seconds; a fit whose plan the cost model (:mod:`fntk.gp.plan`) estimates above
            it is refused before any heavy work (:class:`~fntk.TimeLimitError`, with the estimate).
            Default one hour; ``None`` lifts the limit.
        progress: show a tqdm bar (stderr) over the marginal-likelihood evaluations of ``fit``.
        output_fn: maps the model's output (tuple, dict, ModelOutput) to the tensor that is
            linearized, as in :class:`~fntk.Linearized` (default: a tensor as is, a dict's "logits").

    After :meth:`fit`: ``space_`` ("function" | "weight"), ``solver_`` ("direct" | "iterative"),
    ``scale_``, ``noise_``, ``constant_`` (floats, or (k,) tensors with ``output=None``),
    ``estimated_seconds_`` (the planner's estimates behind the choice).

    A fit that raises or is interrupted (e.g. KeyboardInterrupt from ``callback``) leaves the
    regressor exactly as it was. Calls on one regressor from several threads are serialised by a
    per-object lock (each gets the single-threaded result).

    Example::

        reg = fntk.NTKRegressor(net).fit(x, y)        # x (n, d), y (n,)
        post = reg.predict(x_test)                    # NTKPosterior
        post.mean, post.variance, post.predictive_variance      # (m,) each
        lower, upper = post.confidence_region()       # mean ∓ 2 stddev
        reg.noise_, reg.log_marginal_likelihood(), reg.space_
    """

    def __init__(
        self,
        model: nn.Module | Linearized,
        params: ParamSelection = None,
        output: int | None = 0,
        space: str = "auto",
        noise: float | None = None,
        optimize: bool | Iterable[str] = True,
        method: str = "auto",
        mean: str = "network",
        *,
        scale: float | None = None,
        constant: float | None = None,
        solver: str = "auto",
        solver_options: dict | None = None,
        memory_limit: int | None = None,
        time_limit: float | None = DEFAULT_TIME_LIMIT,
        progress: bool = False,
        output_fn: OutputFn | None = None,
    ):
        v = validation
        for name, value, valid in (("space", space, plan.SPACES), ("solver", solver, plan.SOLVERS),
                                   ("mean", mean, MEANS)):
            if not isinstance(value, str) or value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        self.space, self.solver, self.mean = space, solver, mean
        try:
            NTKMethod(method.lower() if isinstance(method, str) else method)
        except ValueError:
            names = tuple(m.value for m in NTKMethod)
            raise ValueError(
                f"method must be one of {names} (or an fntk.NTKMethod), got {method!r}"
            ) from None
        if output is not None and (isinstance(output, bool) or not isinstance(output, int)):
            raise TypeError(f"output must be an int output index or None, got {output!r}")
        self.learn = _learn(optimize)
        self.noise = v.real("noise", noise, positive=True, allow_none=True)
        self.scale = v.real("scale", scale, positive=True, allow_none=True)
        self.constant = v.real("constant", constant, allow_none=True)
        self.options = iterative.IterativeOptions(**iterative.check_options(solver_options))
        self.memory_limit = v.byte_count("memory_limit", memory_limit)
        self.time_limit = v.seconds_limit("time_limit", time_limit)
        self.progress = v.flag("progress", progress)
        self.output, self.method = output, method
        lin = as_linearized(model, params, output_fn=output_fn)
        # float16/bfloat16 models are linearized through a float32 copy (persist.working_linearization)
        self._model_dtype = lin.dtype
        self.lin = persist.working_linearization(lin)
        self._state = None
        self._lock = threading.RLock()

    def __fntk_state__(self) -> dict:
        """What a saved adapter stores: everything but the lock."""
        return {k: val for k, val in vars(self).items() if k != "_lock"}

    def __fntk_restore__(self) -> None:
        """After loading: a new lock, and the defaults of options added since the file was written."""
        self._lock = threading.RLock()
        for k, val in {**_DEFAULTS, "_model_dtype": self.lin.dtype}.items():
            self.__dict__.setdefault(k, val)

    # ------------------------------------------------------------------ validation
    def _outputs(self) -> list[int]:
        k = self.lin.num_outputs
        if self.output is None:
            return list(range(k))
        if not -k <= self.output < k:
            raise ValueError(f"output={self.output} is out of range for a model with k={k} outputs")
        return [self.output % k]

    def _check_fitted(self) -> None:
        if self._state is None:
            raise NotFittedError("this NTKRegressor is not fitted yet: call fit(x, y) first")

    # ------------------------------------------------------------------ fit
    def fit(self, x: Tensor, y: Tensor, callback: Callback | None = None) -> NTKRegressor:
        """Condition on data x (n, *feature_shape) and targets y (n,) [or (n, k) with output=None],
        learning the hyperparameters first (unless ``optimize=False``). Returns self.

        Before any heavy work the plan's estimated time is checked against ``time_limit`` and its
        dense matrices against ``memory_limit``. ``callback``, if given, is called after every
        marginal-likelihood evaluation of the hyperparameter search with ``{"step",
        "log_marginal_likelihood"}``; whatever it raises (e.g. KeyboardInterrupt) stops the fit,
        leaving the regressor exactly as it was (as does any other error)."""
        callback = check_callback(callback)
        with self._lock, validation.transaction(self):
            self._fit(x, y, callback)
        return self

    def _fit(self, x: Tensor, y: Tensor, callback: Callback | None) -> None:
        lin = self.lin
        x = lin.check_input(x, "x")
        n, outputs = x.shape[0], self._outputs()
        kk = len(outputs)
        Y = check_targets(y, n, kk).to(lin.device)
        R = min(self.options.lanczos_iterations, n if self.space == "function" else lin.num_params)
        # the plan (cheap estimates) and its guards come before the first pass over the data
        pl = plan.plan(lin, x, kk, self.space, self.solver, bool(self.learn), R, self.options.num_probes,
                       self.memory_limit, self.time_limit)
        prior = lin.forward(x)[:, outputs].to(F64) if self.mean == "network" else torch.zeros_like(Y)
        mu, sd = standardise(Y - prior)
        z = ((Y - prior - mu) / sd).T.contiguous()  # (k', n)
        if pl.solver == "direct":
            st = (
                dense.DenseFunction(lin, x, outputs, z, self.method)
                if pl.space == "function"
                else dense.DenseWeight(lin, x, outputs, z)
            )
        else:
            st = iterative.Iterative(lin, x, outputs, z, pl.space, self.options)

        prior_scale = st.prior_scale().clamp_min(1e-300)
        init = Hyper(  # given values are in the data's units: / sd twice (sd² may overflow)
            scale=(1.0 / prior_scale) if self.scale is None else sd.new_full((kk,), self.scale) / sd / sd,
            noise=sd.new_full((kk,), DEFAULT_NOISE)
            if self.noise is None
            else sd.new_full((kk,), self.noise) / sd / sd,
            constant=sd.new_zeros(kk)
            if self.constant is None
            else (sd.new_full((kk,), self.constant) - mu) / sd,
        )
        if self.learn:
            with validation.progress(callback, self.progress, "NTKRegressor.fit") as cb:
                objective = st.objective()
                h = optimize(observe(objective, cb), init, self.learn)
        else:
            objective, h = None, init
        st.condition(h)
        if objective is not None and pl.solver == "iterative":
            st.check_quadrature(objective)
        _check_finite(h, mu, sd)
        self._state, self._mu, self._sd, self._outputs_ = st, mu, sd, outputs
        self.space_, self.solver_, self.estimated_seconds_ = pl.space, pl.solver, pl.seconds
        self.n_ = n
        self._h = h

    # ------------------------------------------------------------------ fitted values
    def _fmt(self, t: Tensor) -> float | Tensor:
        return float(t[0]) if self.output is not None else t

    @property
    def scale_(self) -> float | Tensor:
        """Kernel scale s (original units: y² per unit of J Jᵀ)."""
        with self._lock:
            self._check_fitted()
            return self._fmt(self._h.scale * self._sd**2)

    @property
    def noise_(self) -> float | Tensor:
        """Observation noise variance σ² (original units)."""
        with self._lock:
            self._check_fitted()
            return self._fmt(self._h.noise * self._sd**2)

    @property
    def constant_(self) -> float | Tensor:
        """The constant b of the prior mean (original units)."""
        with self._lock:
            self._check_fitted()
            return self._fmt(self._mu + self._sd * self._h.constant)

    def log_marginal_likelihood(self) -> float | Tensor:
        """log p(y | X, s, σ², b) at the fitted hyperparameters (float, or (k,) per output).

        Exact for the direct solver; with the iterative solver the quadratic term is exact to the
        CG tolerance and the log-determinant a stochastic Lanczos quadrature estimate.
        """
        with self._lock:
            self._check_fitted()
            return self._fmt(self._state.lml() - self.n_ * self._sd.log())

    # ------------------------------------------------------------------ predict
    def predict(self, x: Tensor) -> NTKPosterior:
        """Posterior of f at test inputs x (m, *feature_shape): mean and latent variance (m,)
        [(m, k) with ``output=None``], predictive variance with noise, covariance on demand.

        The test points are processed in chunks whose kernel or Jacobian blocks fit the memory
        budget; the full covariance (m × m per output) is checked against it when first asked for."""
        with self._lock:
            self._check_fitted()
            return self._predict(x)

    def _predict(self, x: Tensor) -> NTKPosterior:
        lin, st, lock = self.lin, self._state, self._lock
        xs = lin.check_input(x, "x")
        outputs, sd, h = self._outputs_, self._sd, self._h
        prior = lin.forward(xs)[:, outputs].to(F64).T if self.mean == "network" else 0.0
        m_std, var_std = plan.predict_chunked(st, lin.memory_budget, xs)
        mean = prior + self._mu[:, None] + sd[:, None] * (h.constant[:, None] + m_std)
        var = var_std.clamp_min(0) * sd[:, None] ** 2
        noise = h.noise * sd**2

        def covariance() -> Tensor:
            with lock:
                plan.check_covariance(st, xs.shape[0], self.memory_limit)
                _, cov = st.predict(xs, full_cov=True)
            cov = cov * (sd**2)[:, None, None]
            return cov[0] if self.output is not None else cov

        if self.output is not None:
            return NTKPosterior(mean[0], var[0], noise[0], covariance)
        return NTKPosterior(mean.T, var.T, noise, covariance)

    def save(self, path: str) -> None:
        """Write the fitted regressor to ``path`` (tensors + JSON metadata; see :mod:`fntk.persist`).
        Reload with ``fntk.load(path, model)`` and the same, unchanged, model."""
        with self._lock:
            persist.save(self, path)

    def __repr__(self) -> str:
        fitted = f", space_={self.space_!r}, solver_={self.solver_!r}" if self._state is not None else ""
        return f"NTKRegressor({self.lin!r}, output={self.output}, space={self.space!r}{fitted})"


def _check_finite(h: Hyper, mu: Tensor, sd: Tensor) -> None:
    """Every derived statistic in the data's units must be a finite float64 (scale, noise,
    constant); a ValueError naming the one that is not (never silent NaN/Inf predictions)."""
    derived = {"scale_": h.scale * sd**2, "noise_": h.noise * sd**2, "constant_": mu + sd * h.constant}
    for name, t in derived.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"the fitted {name} is not finite ({t.tolist()}): the data's scale or the kernel is "
                "out of float64's range; rescale y (or check the network's outputs and Jacobian)"
            )
