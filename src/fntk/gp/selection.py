r"""Fitting NTK-GP models and choosing among them (``NTKRegressor(model="auto")``).

Each candidate :class:`~fntk.gp.models.GPModel` is fitted by its evidence — with the hyperpriors of
:mod:`fntk.gp.priors` (MAP-II) when ``hyperprior`` — and scored three ways, all in the data's
units (a model's z = (y − o(X) − μ)/σ_y has its own σ_y, hence the −n log σ_y):

- ``"loo"``: the leave-one-out predictive log likelihood Σ_i log p(y_i | y_−i) at the fitted
  hyperparameters, in closed form (Rasmussen & Williams 2006, §5.4.2) with the GLS mean
  re-estimated without point i. With P = M⁻¹ − M⁻¹H(HᵀM⁻¹H)⁻¹HᵀM⁻¹ (the inverse of
  M + B·HHᵀ as B → ∞, i.e. a flat prior on β), α = M⁻¹(z − Hβ̂) = Pz:

      z_i − μ_−i = α_i / P_ii,     σ²_−i = 1 / [M⁻¹]_ii,

  μ_−i being the GLS-mean prediction from the other n − 1 points (universal kriging) and σ²_−i
  the GP's predictive variance there with the plug-in mean, as :meth:`NTKRegressor.predict`
  reports it (noise included). O(n²q) from the eigendecomposition (spectral models) or O(n³/3)
  from the Cholesky factor (composite models);
- ``"evidence"``: log p(y | model) with the mean coefficients integrated exactly and the kernel
  and noise hyperparameters by Laplace's method under their hyperpriors
  (:func:`fntk.gp.priors.laplace_evidence`);
- ``"marglik"``: the plain (profiled) log marginal likelihood at the fitted hyperparameters, which
  prefers the most flexible model (it over-fits the choice at small n).

The model with the highest score under ``criterion`` is kept, and only it is conditioned for
prediction (models share the NTK and its one eigendecomposition, which they only read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fntk.gp import priors
from fntk.gp.composite import DenseComposite
from fntk.gp.dense import DenseFunction, DenseWeight
from fntk.gp.hyper import F64, LOG2PI, Hyper, observe, optimize
from fntk.gp.iterative import Iterative, IterativeOptions
from fntk.gp.means import Design, offset_uses_network
from fntk.gp.models import GPModel
from fntk.gp.network import source_variance
from fntk.gp.targets import standardise
from fntk.linearize import Linearized
from fntk.ntk import cache
from fntk.validation import Callback

NOISE_FLOOR = 1e-6
DEFAULT_NOISE = 0.1  # standardised units: a tenth of the residual variance
LEARN_ALL = frozenset({"scale", "noise", "constant"})


def loo_log_densities(minv: Tensor, MinvH: Tensor, Q: Tensor, alpha: Tensor) -> Tensor:
    """log p(z_i | z_−i) (k', n) from diag M⁻¹ (k', n), M⁻¹H (k', n, q), Q = HᵀM⁻¹H (k', q, q) and
    α = M⁻¹(z − Hβ̂) (k', n) (module docstring)."""
    P = minv - (MinvH * torch.linalg.solve(Q, MinvH.mT).mT).sum(-1)
    r, var = alpha / P, 1.0 / minv
    return -0.5 * (LOG2PI + var.log() + r * r / var)


@dataclass
class Candidate:
    """A fitted model: its state (conditioned only when chosen), hyperparameters, mean design and
    standardisation, and its scores."""

    model: GPModel
    state: DenseFunction | DenseWeight | Iterative | DenseComposite
    h: Hyper
    design: Design
    mu: Tensor
    sd: Tensor
    scores: dict[str, float] = field(default_factory=dict)
    conditioned: bool = False


@dataclass
class Shared:
    """What the candidates of one fit share: network outputs, the NTK and its eigendecomposition."""

    lin: Linearized
    x: Tensor
    output: int
    y: Tensor  # (n,) float64
    out: Tensor  # network outputs (n, k) float64
    method: str
    G: Tensor | None = None
    eig: tuple[Tensor, Tensor] | None = None
    spectral: dict = field(default_factory=dict)  # (mean, hyperprior) → fitted spectral Candidate

    def kernel(self) -> Tensor:
        if self.G is None:
            self.G = cache.output_kernels(self.lin, self.x, None, [self.output], self.method).to(F64)
        return self.G


def _standardised(sh: Shared, mean: str) -> tuple[Tensor, Tensor, Tensor, Design, Tensor]:
    """(z (1, n), μ (1,), σ_y (1,), design, H (1, n, q)) of a mean."""
    f = sh.out[:, sh.output]
    o = f if offset_uses_network(mean) else torch.zeros_like(f)
    mu, sd = standardise((sh.y - o)[:, None])
    z = ((sh.y - o - mu) / sd)[None]
    design = Design.build(mean, f[None])
    return z, mu, sd, design, design.columns(f[None], f.shape[0], 1, z)


def _noise_prior(sh: Shared, variance: tuple[int, str] | None, sd: Tensor) -> tuple[float, float]:
    if variance is None:
        return priors.noise_center(None)
    return priors.noise_center(source_variance(sh.out, *variance) / sd[0] ** 2)


def _fit_spectral(sh: Shared, mean: str, hyperprior: bool, init: dict, learn: frozenset[str],
                  variance: tuple[int, str] | None, cb: Callback | None) -> Candidate:
    key = (mean, hyperprior)
    if key in sh.spectral:
        return sh.spectral[key]
    z, mu, sd, design, H = _standardised(sh, mean)
    st = DenseFunction(sh.lin, sh.x, [sh.output], z, sh.method, H=H, G=sh.kernel(), eig=sh.eig)
    scale0 = float(1.0 / st.prior_scale().clamp_min(1e-300))
    noise0 = _noise_prior(sh, variance, sd)
    def given(name: str, default: float) -> Tensor:  # an initial value in the data's units
        return sd.new_full((1,), default) if init.get(name) is None else sd.new_full((1,), init[name])

    h0 = Hyper(  # standardised: / sd twice (sd² may overflow)
        scale=given("scale", scale0) / (1 if init.get("scale") is None else sd * sd),
        noise=given("noise", DEFAULT_NOISE) / (1 if init.get("noise") is None else sd * sd),
        constant=sd.new_zeros(1) if init.get("constant") is None else (given("constant", 0.0) - mu) / sd,
    )

    def log_prior(log_s: Tensor, log_noise: Tensor) -> Tensor:
        return (priors.log_normal(log_s[:, None], math.log(scale0), priors.SCALE_WIDTH)
                + priors.log_normal(log_noise[:, None], math.log(noise0[0]), noise0[1]))

    objective = st.objective()
    sh.eig = st.eigh() if sh.eig is None else sh.eig
    h = optimize(observe(objective, cb), h0, learn, NOISE_FLOOR, log_prior=log_prior if hyperprior else None)
    cand = Candidate(GPModel(mean), st, h, design, mu, sd)
    if learn == LEARN_ALL:
        def fn(u: Tensor) -> Tensor:
            log_noise = torch.log(NOISE_FLOOR + u[1:].exp())
            return objective(u[:1], log_noise, None)[0][0] + log_prior(u[:1], log_noise)[0]

        u = torch.stack([h.scale.log()[0], (h.noise - NOISE_FLOOR).clamp_min(1e-300).log()[0]])
        lml = float(objective(h.scale.log(), h.noise.log(), None)[0][0])
        lp = float(log_prior(h.scale.log(), h.noise.log())[0])
        minv, MinvH, alpha = st.loo_parts(h)
        cand.scores = _scores(lml, lp, fn, u, h.beta[0], H.mT @ MinvH, minv, MinvH, alpha, z.shape[1], sd)
    sh.spectral[key] = cand
    return cand


def _scores(lml: float, lp: float, fn: Callable[[Tensor], Tensor], u: Tensor, beta: Tensor, Q: Tensor,
            minv: Tensor, MinvH: Tensor, alpha: Tensor, n: int, sd: Tensor) -> dict[str, float]:
    """The three criteria (module docstring) in the data's units; Q = HᵀM⁻¹H (1, q, q)."""
    shift = n * float(sd[0].log())
    return {
        "loo": float(loo_log_densities(minv, MinvH, Q, alpha).sum()) - shift,
        "evidence": priors.laplace_evidence(lml, lp, fn, u, beta, Q[0]) - shift,
        "marglik": lml - shift,
        "log_hyperprior": lp,
    }


def _fit_composite(sh: Shared, model: GPModel, hyperprior: bool, init: dict,
                   variance: tuple[int, str] | None, cb: Callback | None) -> Candidate:
    # start from the spectral model with the same mean
    base = _fit_spectral(sh, model.mean, hyperprior, init, LEARN_ALL, variance, cb)
    z, mu, sd, design, H = _standardised(sh, model.mean)
    G = None if model.layer_scales else sh.kernel()
    st = DenseComposite(sh.lin, sh.x, sh.output, z, H, model, G, sd,
                        variance if model.needs_variance else None, sh.method)
    noise0 = _noise_prior(sh, variance, sd)

    def tick(value: Tensor) -> None:
        if cb is not None:
            cb({"log_marginal_likelihood": value})

    u, _ = st.fit(float(base.h.scale[0]), float(base.h.noise[0]), hyperprior, noise0, tick)
    st.condition(u)
    cand = Candidate(model, st, st.h, design, mu, sd, conditioned=True)

    def fn(v: Tensor) -> Tensor:
        return st.log_likelihood(v)[0] + st.log_prior(v, *st.prior_args)

    with torch.no_grad():
        lml = float(st.log_likelihood(u)[0])
        lp = float(st.log_prior(u, *st.prior_args))
    L = st.factor.L[0]
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=F64, device=L.device), upper=False)
    minv = Linv.square().sum(0)[None]
    MinvH = torch.cholesky_solve(H[0], L)[None]
    cand.scores = _scores(lml, lp, fn, u, st.h.beta[0], H.mT @ MinvH, minv, MinvH, st.alpha, z.shape[1], sd)
    st.release()
    return cand


def fit_plain(lin: Linearized, x: Tensor, Y: Tensor, outputs: list[int], space: str, solver: str,
              model: GPModel, init: dict, learn: frozenset[str], method: str, options: IterativeOptions,
              callback: Callback | None) -> Candidate:
    """One spectral model by the plain evidence (no hyperprior, no scores), in any space with any
    solver, k' outputs (Y (n, k')): the NTK-GP as fitted before the model options existed."""
    kk = len(outputs)
    f = lin.forward(x)[:, outputs].to(F64) if offset_uses_network(model.mean) else None
    prior = f if f is not None else torch.zeros_like(Y)
    mu, sd = standardise(Y - prior)
    z = ((Y - prior - mu) / sd).T.contiguous()  # (k', n)
    design = Design.build(model.mean, None if f is None else f.T)
    H = design.columns(None if f is None else f.T, x.shape[0], kk, z)
    if design.slope and "constant" not in learn:
        raise ValueError("mean 'scaled' profiles a and b together: include 'constant' in optimize")
    if solver == "direct":
        st = (DenseFunction(lin, x, outputs, z, method, H=H) if space == "function"
              else DenseWeight(lin, x, outputs, z, H=H))
    else:
        st = Iterative(lin, x, outputs, z, space, options)
    prior_scale = st.prior_scale().clamp_min(1e-300)
    init_h = Hyper(  # given values are in the data's units: / sd twice (sd² may overflow)
        scale=(1.0 / prior_scale) if init["scale"] is None else sd.new_full((kk,), init["scale"]) / sd / sd,
        noise=sd.new_full((kk,), DEFAULT_NOISE) if init["noise"] is None
        else sd.new_full((kk,), init["noise"]) / sd / sd,
        constant=sd.new_zeros(kk) if init["constant"] is None
        else (sd.new_full((kk,), init["constant"]) - mu) / sd,
    )
    objective, h = None, init_h
    if learn:
        objective = st.objective()
        h = optimize(observe(objective, callback), init_h, learn)
    st.condition(h)
    if objective is not None and solver == "iterative":
        st.check_quadrature(objective)
    return Candidate(model, st, h, design, mu, sd, conditioned=True)


def fit_models(sh: Shared, models: Sequence[GPModel], criterion: str, hyperprior: bool, init: dict,
               learn: frozenset[str], variance: tuple[int, str] | None, callback: Callback | None,
               keep: bool = False) -> tuple[Candidate, dict[str, dict[str, float]], list[Candidate]]:
    """Fit every model, keep the best by ``criterion`` (a single model is simply fitted); returns
    (the chosen candidate, conditioned; {model name: scores}; the candidates, all conditioned with
    ``keep``). ``callback`` sees every evaluation of
    every search: ``{"step" (counted over the whole fit), "log_marginal_likelihood" (standardised
    units of that model, without the hyperprior), "model"}``."""
    cands, step = [], [0]
    for model in models:

        def cb(info: dict, name: str = model.name) -> None:
            # one step count over the whole fit; each report names the model being searched
            if callback is not None:
                callback({**info, "step": step[0], "model": name})
            step[0] += 1

        if model.spectral:
            cands.append(_fit_spectral(sh, model.mean, hyperprior, init, learn, variance, cb))
        else:
            cands.append(_fit_composite(sh, model, hyperprior, init, variance, cb))
    scores = {c.model.name: c.scores for c in cands}

    def key(c: Candidate) -> float:
        v = c.scores.get(criterion, -math.inf)
        return v if math.isfinite(v) else -math.inf

    best = cands[0] if len(cands) == 1 else max(cands, key=key)
    for c in cands if keep else [best]:
        if not c.conditioned:
            c.state.condition(c.h)
            c.conditioned = True
    return best, scores, cands


def check_finite(h: Hyper, mu: Tensor, sd: Tensor) -> None:
    """Every derived statistic in the data's units must be a finite float64 (scale, noise,
    constant); a ValueError naming the one that is not (never silent NaN/Inf predictions)."""
    derived = {"scale_": h.scale * sd**2, "noise_": h.noise * sd**2, "constant_": mu + sd * h.constant}
    for name, t in derived.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"the fitted {name} is not finite ({t.tolist()}): the data's scale or the kernel is "
                "out of float64's range; rescale y (or check the network's outputs and Jacobian)"
            )


__all__ = ["check_finite", "Candidate", "Shared", "fit_plain", "fit_models", "loo_log_densities"]
