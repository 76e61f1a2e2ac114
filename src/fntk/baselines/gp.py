r"""The target-only GP baseline: an exact GP with constant mean and an ARD RBF kernel, fitted as a
careful GPyTorch user would: several starts of the hyperparameter search, the best evidence kept.

Model (on the n target points only): y = c + g(x) + ε, g ~ GP(0, s·exp(−½ Σ_d (x_d − x'_d)²/ℓ_d²)),
ε ~ N(0, σ²). The hyperparameters (c, s, ℓ_1..ℓ_d, σ²) maximise the exact log marginal likelihood
(gpytorch ``ExactMarginalLogLikelihood`` with Cholesky solves) from ``restarts`` starts: the first
at the data's own scales (ℓ_d the median pairwise distance along dimension d, s = 1 and σ² = 0.1 in
standardised units), the others drawn log-uniformly around it (ℓ_d × e^U(−2, 2), s × 10^U(−1, 1),
σ² = 10^U(−4, 0)), the noise above GPyTorch's default floor of 1e-4 (standardised units). On
10-point tasks the evidence likes short-lengthscale, near-zero-noise interpolants: with a 1e-8
floor the best of five starts still had a sine test NLL of 22.6 (fntk run sine, 60 tasks), with
the default floor −1.11 (MSE 0.78 either way).

Shapes: n training points, m test points, d input dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gpytorch
import torch
from torch import Tensor

from fntk.baselines.bayesian import GaussianPrediction, one_thread

OPTIMIZERS = ("lbfgs", "adam")
#: noise variance floor in standardised units: GaussianLikelihood's default constraint, as a GPyTorch
#: user gets it (1e-8 let 10-point fits interpolate: sine NLL 22.6 against -1.11 with this floor)
NOISE_FLOOR = 1e-4


def _as2d(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(t).detach().to(dtype)
    return t.unsqueeze(1) if t.ndim == 1 else t


def _median_distance(X: Tensor) -> Tensor:
    """Per-dimension median |x_id − x_jd| over pairs i < j (1 where it is 0): (d,)."""
    n = X.shape[0]
    if n < 2:
        return torch.ones(X.shape[1], dtype=X.dtype)
    i, j = torch.triu_indices(n, n, 1)
    med = (X[i] - X[j]).abs().median(dim=0).values
    return torch.where(med > 0, med, torch.ones_like(med))


class _ExactGP(gpytorch.models.ExactGP):
    def __init__(self, X: Tensor, Y: Tensor, lik, ard_dims: int | None):
        super().__init__(X, Y, lik)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=ard_dims))

    def forward(self, z):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))


def _fit_start(X, Yn, ard, start, fixed, steps, lr, optimizer, dtype):
    """One hyperparameter search from ``start`` (standardised units): (final log marginal
    likelihood per point — gpytorch's mll divides by n —, model, likelihood)."""
    # the noise floor of gpytorch's GaussianLikelihood default (GreaterThan(1e-4)), on standardised y
    floor = gpytorch.constraints.GreaterThan(NOISE_FLOOR)
    lik = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=floor)
    model = _ExactGP(X, Yn, lik, X.shape[1] if ard else None).to(dtype)
    kern = model.covar_module
    with torch.no_grad():
        lik.noise = start["noise"]
        kern.base_kernel.lengthscale = start["lengthscale"]
        kern.outputscale = start["outputscale"]
        model.mean_module.constant = start["mean"]
    raws = {"lengthscale": kern.base_kernel.raw_lengthscale, "outputscale": kern.raw_outputscale,
            "noise": lik.noise_covar.raw_noise, "mean": model.mean_module.raw_constant}
    for name in fixed:
        raws[name].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    model.train()

    def loss() -> Tensor:
        return -mll(model(X), Yn)

    if params and steps > 0:
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss().backward()
                opt.step()
        else:
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad(set_to_none=True)
                value = loss()
                value.backward()
                return value

            try:
                opt.step(closure)
            except RuntimeError:  # a failed line search (e.g. a non-PD kernel at an extreme step)
                pass
    with torch.no_grad():
        try:
            final = -float(loss())
        except RuntimeError:  # gpytorch's NotPSDError: this start ended somewhere unusable
            final = -math.inf
    return final, model, lik


@one_thread()
def rbf_gp(
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    steps: int = 100,
    lr: float = 0.05,
    optimizer: str = "lbfgs",
    ard: bool = True,
    restarts: int = 5,
    standardize: bool = True,
    lengthscale: float | Sequence[float] | None = None,
    outputscale: float | None = None,
    noise: float | None = None,
    mean: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> GaussianPrediction:
    """Exact GP with constant mean and ``ScaleKernel(RBFKernel)`` (ARD by default) on the target
    points only; see the module docstring for the model and the multi-start search.

    Args:
        x: (n, d) or (n,) training inputs; y: (n,) targets; x_test: (m, d) or (m,).
        steps: L-BFGS iterations (strong Wolfe) or Adam steps per start; ``optimizer``: "lbfgs" | "adam".
        ard: one lengthscale per input dimension (else one shared lengthscale).
        restarts: starts of the search (≥ 1); the one with the highest final evidence is kept.
        standardize: work on (y − ȳ)/s internally (s the std of y); results in the units of y.
        lengthscale, outputscale, noise, mean: fixed values (units of x and y) instead of learning them
            (``lengthscale``: one value, or d values with ``ard``).
        seed: seeds the random starts.

    Returns:
        :class:`GaussianPrediction` with mean and latent variance (m,), noise, and ``info`` holding
        the hyperparameters (units of y), the final log marginal likelihood per point, and the
        evidence per point of every start (``start_log_marginal_likelihoods``, standardised units).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive int, got {restarts!r}")
    X, Xs = _as2d(x, dtype), _as2d(x_test, dtype)
    Y = torch.as_tensor(y).detach().to(dtype).reshape(-1)
    if X.shape[0] != Y.shape[0] or X.shape[1] != Xs.shape[1]:
        raise ValueError(f"shapes: x {tuple(X.shape)}, y {tuple(Y.shape)}, x_test {tuple(Xs.shape)}")
    mu, s = (float(Y.mean()), float(Y.std())) if standardize and Y.numel() > 1 else (0.0, 1.0)
    s = s if s > 0 else 1.0
    Yn = (Y - mu) / s
    d = X.shape[1] if ard else 1
    base_ls = _median_distance(X) if ard else _median_distance(X).median().reshape(1)
    given = {"lengthscale": lengthscale, "outputscale": outputscale, "noise": noise, "mean": mean}
    fixed = [k for k, v in given.items() if v is not None]
    fixed_std = {
        "lengthscale": None if lengthscale is None else torch.as_tensor(lengthscale, dtype=dtype).expand(d),
        "outputscale": None if outputscale is None else outputscale / s**2,
        "noise": None if noise is None else noise / s**2,
        "mean": None if mean is None else (mean - mu) / s,
    }
    g = torch.Generator().manual_seed(seed)
    starts = []
    for r in range(restarts if len(fixed) < 4 else 1):
        u = torch.rand(d + 2, generator=g, dtype=dtype)
        start = {"lengthscale": base_ls * (torch.exp(4 * u[:d] - 2) if r else 1.0),
                 "outputscale": float(10 ** (2 * u[d] - 1)) if r else 1.0,
                 "noise": float(10 ** (-4 * u[d + 1])) if r else 0.1, "mean": 0.0}
        starts.append({k: (fixed_std[k] if fixed_std[k] is not None else v) for k, v in start.items()})
    exact = gpytorch.settings.fast_computations(False, False, False)
    with gpytorch.settings.max_cholesky_size(10**6), exact:
        fits = [_fit_start(X, Yn, ard, st, fixed, steps, lr, optimizer, dtype) for st in starts]
        best = max(range(len(fits)), key=lambda i: fits[i][0])
        final, model, lik = fits[best]
        if not math.isfinite(final):
            raise ValueError("rbf_gp: every start of the hyperparameter search ended at a non-PD kernel")
        with torch.no_grad():
            model.eval()
            post = model(Xs)
            m_out, v_out = post.mean * s + mu, post.variance * s**2
    info = {
        "lengthscale": model.covar_module.base_kernel.lengthscale.detach().reshape(-1).tolist(),
        "outputscale": float(model.covar_module.outputscale.detach()) * s**2,
        "noise": float(lik.noise.detach()) * s**2,
        "mean": float(model.mean_module.constant.detach()) * s + mu,
        "log_marginal_likelihood_per_point": final - math.log(s),
        "start_log_marginal_likelihoods": [f[0] for f in fits],  # per point, standardised units
        "best_start": best,
    }
    return GaussianPrediction(mean=m_out.detach(), variance=v_out.detach(), noise=info["noise"], info=info)


__all__ = ["rbf_gp", "OPTIMIZERS"]
