r"""NTK Gaussian-process regression: adapt a trained network to a new regression task exactly.

Model (for the selected output c of the network, n training points X, targets y):

    y = m(x) + g(x) + ε,   g ~ GP(0, s·J_c(x)J_c(x')ᵀ),   ε ~ N(0, σ²),
    m(x) = f_c(x; θ̂) + b ("network"),  b ("constant", the paper's code)  or  a·f_c(x; θ̂) + b ("scaled"),

i.e. the Bayesian linear model f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂) with prior w − θ̂ ~ N(0, s·I),
and its extensions (:mod:`fntk.gp.models`): an input-space kernel added to the NTK, one scale per
layer, noise from the source net's variance output. The hyperparameters maximise the exact log
marginal likelihood (a and b profiled by generalised least squares), with hyperpriors when the
model is chosen automatically; ``gp_model="auto"`` (the default) chooses among a candidate set by the
leave-one-out predictive likelihood (:mod:`fntk.gp.selection`). Internally y − o(X) is
standardised; all reported quantities (predictions, hyperparameters, marginal likelihood) are in
the original units.

Function space works with the n × n kernel, weight space with the p × p matrix JᵀJ (push-through
identity; determinant lemma for the marginal likelihood); both are exact and agree. See
:mod:`fntk.gp.dense` for the maths and :mod:`fntk.gp.plan` for the automatic choice.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fntk import inputs, persist, validation
from fntk.errors import NotFittedError
from fntk.gp import iterative, plan, posterior, selection
from fntk.gp.hyper import F64
from fntk.gp.means import Design, offset_uses_network
from fntk.gp.models import CRITERIA, VARIANCE_LINKS, GPModel, parse_optimize, parse_options, resolve
from fntk.gp.network import check_variance_output
from fntk.gp.posterior import NTKPosterior
from fntk.gp.targets import check_targets
from fntk.linearize import Linearized, ParamSelection, as_linearized
from fntk.linearize.outputs import OutputFn
from fntk.ntk import NTKMethod
from fntk.validation import Callback, check_callback

#: default ``time_limit``: fits the planner estimates above one hour are refused
DEFAULT_TIME_LIMIT = 3600.0
#: attributes of objects saved before they existed (restored on load)
_DEFAULTS = {"time_limit": DEFAULT_TIME_LIMIT, "progress": False, "variance_output": None,
             "variance_link": "softplus", "criterion": "loo", "hyperprior": None, "_design": None,
             "_variance": None, "model_scores_": {}, "keep_candidates": False, "candidates_": {}}
DEFAULT_CRITERION = "loo"


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
        mean: shorthand for ``gp_model=<mean>``: ``"network"`` (f_c(x; θ̂) + b, the plain NTK-GP),
            ``"constant"`` (b only) or ``"scaled"`` (a·f_c(x; θ̂) + b, a and b by GLS).
        gp_model: ``"auto"`` (default: choose among :func:`fntk.gp.models.default_candidates` by
            ``criterion``), a model name (``"network"``, ``"scaled+rbf"``, ``"network+hetero"``, ...;
            :mod:`fntk.gp.models`), a :class:`~fntk.gp.models.GPModel`, or a list of them to choose
            among. The choice runs for one output in function space with the direct solver and
            every hyperparameter learned (given ``scale``/``constant`` or ``optimize`` ≠ True keep
            the plain ``"network"`` model), on at least 10 points; composite candidates (input
            kernel, source noise) only up to n = 2,000 points in the automatic set.
        variance_output, variance_link: the output of a heteroscedastic net that gives its
            variance σ²_src(x) = link(f_v(x)) (link ``"softplus"`` | ``"exp"`` | ``"identity"``),
            needed by ``+hetero`` and ``@src`` models; with it, ``gp_model="auto"`` adds those.
        criterion: how ``gp_model`` candidates are compared: ``"loo"`` (the closed-form leave-one-out
            predictive log likelihood), ``"evidence"`` (Laplace evidence with hyperpriors) or
            ``"marglik"`` (the plain marginal likelihood, which over-fits the choice).
        hyperprior: fit with the hyperpriors of :mod:`fntk.gp.priors` (MAP-II); default None: on
            when ``gp_model`` chooses among several models, off for a single model (the plain
            evidence, as before).
        keep_candidates: keep every fitted candidate as ``candidates_[name]``, a fitted regressor
            of its own (not saved with the adapter; each holds its own n × n factor).
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
    ``model_`` (the fitted model's name), ``model_scores_`` ({name: {"loo", "evidence",
    "marglik", "log_hyperprior"}} of every candidate scored, data units), ``scale_``, ``noise_``,
    ``constant_``, ``slope_`` (floats, or (k,) tensors with ``output=None``), ``hyperparameters_``
    (all learned values, data units), ``estimated_seconds_`` (the planner's estimates).

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
        mean: str | None = None,
        *,
        gp_model: str | GPModel | Iterable = "auto",
        variance_output: int | None = None,
        variance_link: str = "softplus",
        criterion: str = DEFAULT_CRITERION,
        hyperprior: bool | None = None,
        scale: float | None = None,
        constant: float | None = None,
        solver: str = "auto",
        solver_options: dict | None = None,
        memory_limit: int | None = None,
        time_limit: float | None = DEFAULT_TIME_LIMIT,
        progress: bool = False,
        output_fn: OutputFn | None = None,
        keep_candidates: bool = False,
    ):
        v = validation
        for name, value, valid in (("space", space, plan.SPACES), ("solver", solver, plan.SOLVERS),
                                   ("criterion", criterion, CRITERIA), ("variance_link", variance_link,
                                                                         VARIANCE_LINKS)):
            if not isinstance(value, str) or value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        self.space, self.solver, self.criterion, self.variance_link = space, solver, criterion, variance_link
        self.models = parse_options(mean, gp_model)
        # mean: the legacy option; the mean of the fitted model is self._model.mean
        self.mean = self.models[0].mean if self.models is not None and len(self.models) == 1 else "network"
        if variance_output is not None and (
            isinstance(variance_output, bool) or not isinstance(variance_output, int)
        ):
            raise TypeError(f"variance_output must be an int output index or None, got {variance_output!r}")
        self.variance_output = variance_output
        self.hyperprior = None if hyperprior is None else v.flag("hyperprior", hyperprior)
        self.keep_candidates = v.flag("keep_candidates", keep_candidates)
        try:
            NTKMethod(method.lower() if isinstance(method, str) else method)
        except ValueError:
            names = tuple(m.value for m in NTKMethod)
            raise ValueError(
                f"method must be one of {names} (or an fntk.NTKMethod), got {method!r}"
            ) from None
        if output is not None and (isinstance(output, bool) or not isinstance(output, int)):
            raise TypeError(f"output must be an int output index or None, got {output!r}")
        self.learn = parse_optimize(optimize)
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
        """What a saved adapter stores: everything but the lock and the kept candidates."""
        return {k: val for k, val in vars(self).items() if k not in ("_lock", "candidates_")}

    def __fntk_restore__(self) -> None:
        """After loading: a new lock, and the defaults of options added since the file was written."""
        self._lock = threading.RLock()
        for k, val in {**_DEFAULTS, "_model_dtype": self.lin.dtype}.items():
            self.__dict__.setdefault(k, val)
        self.__dict__.setdefault("models", [GPModel(self.mean)])  # files before the model option
        if self._state is not None:
            self.__dict__.setdefault("_model", GPModel(self.mean))
            self.__dict__.setdefault("model_", self._model.name)

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
    def fit(self, x: Tensor | dict | Iterable, y: Tensor | None = None,
            callback: Callback | None = None) -> NTKRegressor:
        """Condition on data x (n, *feature_shape) and targets y (n,) [or (n, k) with output=None],
        learning the hyperparameters first (unless ``optimize=False``). Returns self.

        x may be a dict of tensors batched along axis 0 (the model is called as ``model(**x)``), or
        a re-iterable of (x_b, y_b) batches (a ``DataLoader``; then y is None): its batches are
        validated one by one and the inputs and targets collected in memory (the function-space
        kernel needs all n points; no Jacobian is stored). Dict inputs leave the input-kernel
        models (``+rbf``, ...) out of ``gp_model="auto"`` (they have no feature vector).

        Before any heavy work the plan's estimated time is checked against ``time_limit`` and its
        dense matrices against ``memory_limit``. ``callback``, if given, is called after every
        marginal-likelihood evaluation of the hyperparameter search with ``{"step",
        "log_marginal_likelihood"}``; whatever it raises (e.g. KeyboardInterrupt) stops the fit,
        leaving the regressor exactly as it was (as does any other error)."""
        callback = check_callback(callback)
        x, y = inputs.fit_data(x, y)
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
        fixed = self.scale is not None or self.constant is not None
        models = resolve(self.models, single_output=self.output is not None, space=pl.space,
                         solver=pl.solver, learn_all=self.learn == selection.LEARN_ALL, fixed=fixed, n=n,
                         has_variance=self.variance_output is not None,
                         dict_inputs=None if isinstance(x, Tensor) else inputs.describe(x))
        variance = None  # (index, link): informs the noise prior of every model, feeds +hetero/@src
        needs = [m.name for m in models if m.needs_variance]
        if needs or self.variance_output is not None:
            index = check_variance_output(self.variance_output, lin.num_outputs,
                                          f"model {needs[0]!r}" if needs else "variance_output")
            variance = (index, self.variance_link)
        hyperprior = self.hyperprior if self.hyperprior is not None else len(models) > 1
        plan.check_choice(models, n, self.memory_limit, self.time_limit)
        init = {"scale": self.scale, "noise": self.noise, "constant": self.constant}
        with validation.progress(callback, self.progress, "NTKRegressor.fit") as cb:
            if len(models) == 1 and models[0].spectral and not hyperprior:
                best = selection.fit_plain(lin, x, Y, outputs, pl.space, pl.solver, models[0], init,
                                           self.learn, self.method, self.options, cb)
                scores, cands = {}, [best]
            else:  # one output, function space, direct solver (checked by resolve)
                sh = selection.Shared(lin, x, outputs[0], Y[:, 0], lin.forward(x).to(F64), self.method)
                best, scores, cands = selection.fit_models(sh, models, self.criterion, hyperprior, init,
                                                           self.learn, variance, cb, self.keep_candidates)
        self._store(best, variance, scores, outputs)
        self.space_, self.solver_, self.estimated_seconds_ = pl.space, pl.solver, pl.seconds
        self.n_, self.candidates_ = n, {}
        for c in cands if self.keep_candidates else []:  # each a fitted regressor of its own
            other = copy.copy(self)
            other._lock = threading.RLock()
            self.candidates_[c.model.name] = other._store(c, variance, {c.model.name: c.scores}, outputs)

    def _store(self, c: selection.Candidate, variance, scores: dict, outputs: list[int]) -> NTKRegressor:
        """Make ``c`` the fitted model (checked finite); returns self."""
        selection.check_finite(c.h, c.mu, c.sd)
        self._state, self._mu, self._sd, self._outputs_ = c.state, c.mu, c.sd, outputs
        self._h, self._design, self._model = c.h, c.design, c.model
        self._variance = variance if c.model.needs_variance else None
        self.model_, self.model_scores_, self.candidates_ = c.model.name, scores, {}
        return self

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

    def _coefficients(self) -> tuple[Tensor, Tensor]:
        """(a, b) of the prior mean a·f + b in the data's units, (k',) each."""
        design = self._design if self._design is not None else Design(False)
        a, b = design.coefficients(self._h.beta, self._mu, self._sd)
        return (a if offset_uses_network(self._model.mean) else torch.zeros_like(a)), b

    @property
    def constant_(self) -> float | Tensor:
        """The constant b of the prior mean (original units)."""
        with self._lock:
            self._check_fitted()
            if self._design is None or not self._design.slope:
                return self._fmt(self._mu + self._sd * self._h.constant)
            return self._fmt(self._coefficients()[1])

    @property
    def slope_(self) -> float | Tensor:
        """The factor a of the network output in the prior mean a·f + b: 1 ("network"), 0
        ("constant"), learned ("scaled")."""
        with self._lock:
            self._check_fitted()
            return self._fmt(self._coefficients()[0])

    @property
    def hyperparameters_(self) -> dict:
        """Every learned value in the data's units: scale (or layer_scales), noise, constant,
        slope, and for composite models input_scale, lengthscales, noise_multiplier."""
        with self._lock:
            self._check_fitted()
            sd2 = self._sd**2
            out = {"scale": self._fmt(self._h.scale * sd2), "noise": self._fmt(self._h.noise * sd2)}
            if hasattr(self._state, "hyperparameters"):
                out = self._state.hyperparameters(self._sd)
            a, b = self._coefficients()
            return {**out, "constant": self._fmt(b), "slope": self._fmt(a)}

    def log_marginal_likelihood(self) -> float | Tensor:
        """log p(y | X, s, σ², b) at the fitted hyperparameters (float, or (k,) per output).

        Exact for the direct solver; with the iterative solver the quadratic term is exact to the
        CG tolerance and the log-determinant a stochastic Lanczos quadrature estimate.
        """
        with self._lock:
            self._check_fitted()
            return self._fmt(self._state.lml() - self.n_ * self._sd.log())

    # ------------------------------------------------------------------ predict
    def predict(self, x: Tensor | dict | Iterable) -> NTKPosterior:
        """Posterior of f at test inputs x (m, *feature_shape): mean and latent variance (m,)
        [(m, k) with ``output=None``], predictive variance with noise, covariance on demand.

        The test points are processed in chunks whose kernel or Jacobian blocks fit the memory
        budget; the full covariance (m × m per output) is checked against it when first asked for.
        A re-iterable of batches (``DataLoader``; targets in the batches are ignored) is predicted
        batch by batch (a tqdm bar over the batches with ``progress=True``), the results
        concatenated; its covariance collects the test inputs when first asked for."""
        with self._lock:
            self._check_fitted()
            if inputs.is_loader(x):
                return posterior.over_batches(self, x)
            return posterior.at(self, x)

    def save(self, path: str) -> None:
        """Write the fitted regressor to ``path`` (tensors + JSON metadata; see :mod:`fntk.persist`).
        Reload with ``fntk.load(path, model)`` and the same, unchanged, model."""
        with self._lock:
            persist.save(self, path)

    def __repr__(self) -> str:
        fitted = (f", model_={self.model_!r}, space_={self.space_!r}, solver_={self.solver_!r}"
                  if self._state is not None else "")
        return f"NTKRegressor({self.lin!r}, output={self.output}, space={self.space!r}{fitted})"
