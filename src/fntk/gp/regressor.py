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

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fntk import persist
from fntk.errors import NotFittedError
from fntk.gp import dense, iterative, plan
from fntk.gp.hyper import F64, Hyper, observe, optimize
from fntk.gp.posterior import NTKPosterior
from fntk.linearize import Linearized, ParamSelection
from fntk.ntk import NTKMethod
from fntk.validation import Callback, check_callback

MEANS = ("network", "constant")
HYPERPARAMETERS = ("scale", "noise", "constant")
DEFAULT_NOISE = 0.1  # standardised units: a tenth of the residual variance


def _positive(name: str, v: float | None) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite float or None, got {v!r}")
    return float(v)


@persist.register("NTKRegressor")
class NTKRegressor:
    r"""Exact GP regression with the empirical NTK of a trained network (its linearization).

    Args:
        model: the trained ``nn.Module`` (never modified), or a :class:`~fntk.Linearized`.
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
            available RAM); beyond it "auto" goes matrix-free.

    After :meth:`fit`: ``space_`` ("function" | "weight"), ``solver_`` ("direct" | "iterative"),
    ``scale_``, ``noise_``, ``constant_`` (floats, or (k,) tensors with ``output=None``),
    ``estimated_seconds_`` (the planner's estimates behind the choice).

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
    ):
        if isinstance(model, Linearized):
            if params is not None:
                raise ValueError("params must be None when model is already a fntk.Linearized")
            self.lin = model
        else:
            self.lin = Linearized(model, params)
        if space not in plan.SPACES:
            raise ValueError(f"space must be one of {plan.SPACES}, got {space!r}")
        if solver not in plan.SOLVERS:
            raise ValueError(f"solver must be one of {plan.SOLVERS}, got {solver!r}")
        if mean not in MEANS:
            raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
        try:
            NTKMethod(method.lower() if isinstance(method, str) else method)
        except ValueError:
            names = tuple(m.value for m in NTKMethod)
            raise ValueError(
                f"method must be one of {names} (or an fntk.NTKMethod), got {method!r}"
            ) from None
        if output is not None and (isinstance(output, bool) or not isinstance(output, int)):
            raise ValueError(f"output must be an int output index or None, got {output!r}")
        if isinstance(optimize, bool):
            learn = frozenset(HYPERPARAMETERS) if optimize else frozenset()
        else:
            learn = frozenset(optimize)
            unknown = sorted(learn - set(HYPERPARAMETERS))
            if unknown:
                raise ValueError(f"optimize: unknown hyperparameter(s) {unknown}; valid: {HYPERPARAMETERS}")
        if constant is not None and not (isinstance(constant, (int, float)) and math.isfinite(constant)):
            raise ValueError(f"constant must be a finite float or None, got {constant!r}")
        opts = dict(solver_options or {})
        valid = tuple(iterative.IterativeOptions.__dataclass_fields__)
        bad = sorted(set(opts) - set(valid))
        if bad:
            raise ValueError(f"solver_options: unknown key(s) {bad}; valid keys: {valid}")
        self.output, self.space, self.solver, self.method, self.mean = output, space, solver, method, mean
        self.noise, self.scale = _positive("noise", noise), _positive("scale", scale)
        self.constant = None if constant is None else float(constant)
        self.learn = learn
        self.options = iterative.IterativeOptions(**opts)
        self.memory_limit = memory_limit
        self._state = None

    # ------------------------------------------------------------------ validation
    def _outputs(self) -> list[int]:
        k = self.lin.num_outputs
        if self.output is None:
            return list(range(k))
        if not -k <= self.output < k:
            raise ValueError(f"output={self.output} is out of range for a model with k={k} outputs")
        return [self.output % k]

    def _check_y(self, y, n: int, kk: int) -> Tensor:
        """y → (n, k') float64; clear errors for wrong shapes and non-finite values."""
        expected = f"({n},)" if kk == 1 else f"({n}, {kk})"
        if not isinstance(y, Tensor):
            try:
                y = torch.as_tensor(y)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(
                    f"y must be a tensor or array of shape {expected}, got {type(y).__name__}"
                ) from err
        if not (y.is_floating_point() or y.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
            raise TypeError(f"y must be real-valued, got dtype {y.dtype}")
        shape = tuple(y.shape)
        if y.dim() == 0 or y.shape[0] != n:
            got = "a scalar" if y.dim() == 0 else f"{y.shape[0]} rows (shape {shape})"
            raise ValueError(f"y has {got} but x has n={n} points; expected y of shape {expected}")
        if kk == 1 and y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if (kk == 1 and y.dim() != 1) or (kk > 1 and (y.dim() != 2 or y.shape[1] != kk)):
            raise ValueError(f"y must have shape {expected} for {kk} output(s), got {shape}")
        y = y.to(F64).reshape(n, kk)
        bad = ~torch.isfinite(y).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"y contains NaN or Inf (first at index {int(bad.nonzero()[0, 0])})")
        return y

    def _check_fitted(self) -> None:
        if self._state is None:
            raise NotFittedError("this NTKRegressor is not fitted yet: call fit(x, y) first")

    # ------------------------------------------------------------------ fit
    def fit(self, x: Tensor, y: Tensor, callback: Callback | None = None) -> NTKRegressor:
        """Condition on data x (n, *feature_shape) and targets y (n,) [or (n, k) with output=None],
        learning the hyperparameters first (unless ``optimize=False``). Returns self.

        ``callback``, if given, is called after every marginal-likelihood evaluation of the
        hyperparameter search with ``{"step", "log_marginal_likelihood"}``; whatever it raises
        (e.g. KeyboardInterrupt) stops the fit, leaving the regressor as it was."""
        callback = check_callback(callback)
        lin = self.lin
        x = lin.check_input(x, "x")
        n, outputs = x.shape[0], self._outputs()
        kk = len(outputs)
        Y = self._check_y(y, n, kk).to(lin.device)
        prior = lin.forward(x)[:, outputs].to(F64) if self.mean == "network" else torch.zeros_like(Y)
        resid = Y - prior
        mu = resid.mean(0)
        sd = resid.std(0, correction=0)
        sd = torch.where(sd > 1e-12 * (1 + mu.abs()), sd, torch.ones_like(sd))
        z = ((resid - mu) / sd).T.contiguous()  # (k', n)

        R = min(self.options.lanczos_iterations, n if self.space == "function" else lin.num_params)
        pl = plan.plan(
            lin,
            x,
            kk,
            self.space,
            self.solver,
            bool(self.learn),
            R,
            self.options.num_probes,
            self.memory_limit,
        )
        if pl.solver == "direct":
            st = (
                dense.DenseFunction(lin, x, outputs, z, self.method)
                if pl.space == "function"
                else dense.DenseWeight(lin, x, outputs, z)
            )
        else:
            st = iterative.Iterative(lin, x, outputs, z, pl.space, self.options)

        prior_scale = st.prior_scale().clamp_min(1e-300)
        init = Hyper(
            scale=(1.0 / prior_scale) if self.scale is None else sd.new_full((kk,), self.scale) / sd**2,
            noise=sd.new_full((kk,), DEFAULT_NOISE)
            if self.noise is None
            else sd.new_full((kk,), self.noise) / sd**2,
            constant=sd.new_zeros(kk)
            if self.constant is None
            else (sd.new_full((kk,), self.constant) - mu) / sd,
        )
        h = optimize(observe(st.objective(), callback), init, self.learn) if self.learn else init
        st.condition(h)
        self._state, self._mu, self._sd, self._outputs_ = st, mu, sd, outputs
        self.space_, self.solver_, self.estimated_seconds_ = pl.space, pl.solver, pl.seconds
        self.n_ = n
        self._h = h
        return self

    # ------------------------------------------------------------------ fitted values
    def _fmt(self, t: Tensor) -> float | Tensor:
        return float(t[0]) if self.output is not None else t

    @property
    def scale_(self) -> float | Tensor:
        """Kernel scale s (original units: y² per unit of J Jᵀ)."""
        self._check_fitted()
        return self._fmt(self._h.scale * self._sd**2)

    @property
    def noise_(self) -> float | Tensor:
        """Observation noise variance σ² (original units)."""
        self._check_fitted()
        return self._fmt(self._h.noise * self._sd**2)

    @property
    def constant_(self) -> float | Tensor:
        """The constant b of the prior mean (original units)."""
        self._check_fitted()
        return self._fmt(self._mu + self._sd * self._h.constant)

    def log_marginal_likelihood(self) -> float | Tensor:
        """log p(y | X, s, σ², b) at the fitted hyperparameters (float, or (k,) per output).

        Exact for the direct solver; with the iterative solver the quadratic term is exact to the
        CG tolerance and the log-determinant a stochastic Lanczos quadrature estimate.
        """
        self._check_fitted()
        return self._fmt(self._state.lml() - self.n_ * self._sd.log())

    # ------------------------------------------------------------------ predict
    def predict(self, x: Tensor) -> NTKPosterior:
        """Posterior of f at test inputs x (m, *feature_shape): mean and latent variance (m,)
        [(m, k) with ``output=None``], predictive variance with noise, covariance on demand."""
        self._check_fitted()
        lin, st = self.lin, self._state
        xs = lin.check_input(x, "x")
        outputs = self._outputs_
        prior = lin.forward(xs)[:, outputs].to(F64).T if self.mean == "network" else 0.0
        mu, sd = self._mu[:, None], self._sd[:, None]
        m_std, var_std = st.predict(xs, full_cov=False)
        mean = prior + mu + sd * (self._h.constant[:, None] + m_std)
        var = var_std.clamp_min(0) * sd**2
        noise = self._h.noise * self._sd**2

        def covariance() -> Tensor:
            _, cov = st.predict(xs, full_cov=True)
            cov = cov * (self._sd**2)[:, None, None]
            return cov[0] if self.output is not None else cov

        if self.output is not None:
            return NTKPosterior(mean[0], var[0], noise[0], covariance)
        return NTKPosterior(mean.T, var.T, noise, covariance)

    def save(self, path: str) -> None:
        """Write the fitted regressor to ``path`` (tensors + JSON metadata; see :mod:`fntk.persist`).
        Reload with ``fntk.load(path, model)`` and the same, unchanged, model."""
        persist.save(self, path)

    def __repr__(self) -> str:
        fitted = f", space_={self.space_!r}, solver_={self.solver_!r}" if self._state is not None else ""
        return f"NTKRegressor({self.lin!r}, output={self.output}, space={self.space!r}{fitted})"
