"""The predictive distribution returned by :meth:`fntk.NTKRegressor.predict` (:class:`NTKPosterior`),
and how a fitted regressor computes it at test points (:func:`at`, :func:`over_batches`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from gpytorch.distributions import MultivariateNormal
from torch import Tensor

from fntk import inputs, validation
from fntk.gp import plan
from fntk.gp.hyper import F64
from fntk.gp.means import offset_uses_network
from fntk.linalg import psd_root


class NTKPosterior:
    r"""Gaussian posterior of the latent function f(x*) at m test points, in the data's units.

    Shapes: m test points; a single output gives (m,) vectors and (m, m) covariances; a
    multi-output regressor (``output=None``, k outputs, independent GPs) gives (m, k) and
    (k, m, m).

    Attributes:
        mean: E[f(x*)] = prior mean (network and/or constant) + posterior correction.
        variance: Var[f(x*)], the latent (noise-free) variance.
        noise: the observation noise variance σ² at the test points: a 0-d tensor (one output),
            (m,) (one output, input-dependent noise) or (k,) (k outputs).
    """

    def __init__(
        self,
        mean: Tensor,
        variance: Tensor,
        noise: Tensor,
        covariance_fn: Callable[[], Tensor],
    ):
        self.mean = mean
        self.variance = variance
        self.noise = noise
        self._covariance_fn = covariance_fn
        self._cov: Tensor | None = None

    @property
    def predictive_variance(self) -> Tensor:
        """Var[y*] = Var[f(x*)] + σ² (a new noisy observation)."""
        return self.variance + self.noise

    @property
    def stddev(self) -> Tensor:
        """√Var[f(x*)] (latent)."""
        return self.variance.clamp_min(0).sqrt()

    @property
    def predictive_stddev(self) -> Tensor:
        """√(Var[f(x*)] + σ²)."""
        return self.predictive_variance.clamp_min(0).sqrt()

    @property
    def covariance_matrix(self) -> Tensor:
        """The latent covariance Cov[f(x*)]: (m, m), or (k, m, m) for k outputs (computed on first use)."""
        if self._cov is None:
            self._cov = self._covariance_fn()
        return self._cov

    def confidence_region(self, num_std: float = 2.0, predictive: bool = False) -> tuple[Tensor, Tensor]:
        """(lower, upper) = mean ∓ num_std · stddev (latent; with ``predictive=True`` including noise).

        ``num_std=2`` (the default, as GPyTorch's ``confidence_region``) is a ≈95.4% interval.
        """
        num_std = validation.real("num_std", num_std, positive=True)
        validation.flag("predictive", predictive)
        sd = self.predictive_stddev if predictive else self.stddev
        return self.mean - num_std * sd, self.mean + num_std * sd

    def sample(
        self, num_samples: int = 1, predictive: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Joint samples of f(x*) (or of y* with ``predictive=True``): (s, m), or (s, m, k).

        f = μ + A ε with A Aᵀ = Σ (:func:`fntk.linalg.psd_root`, per output) and ε (k', m, s) from
        ``torch.randn(..., generator=generator)``."""
        num_samples = validation.positive_int("num_samples", num_samples)
        validation.flag("predictive", predictive)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        cov = self.covariance_matrix
        multi = cov.dim() == 3
        C = cov if multi else cov[None]
        m = C.shape[-1]
        if predictive:
            noise = torch.as_tensor(self.noise, dtype=C.dtype).to(C.device)
            if not multi and noise.dim() == 1:  # one variance per test point
                C = C + torch.diag_embed(noise)[None]
            else:
                C = C + noise.reshape(-1, 1, 1) * torch.eye(m, dtype=C.dtype, device=C.device)
        A = psd_root(C)  # exact for the singular covariances of repeated or training points
        eps = torch.randn(C.shape[0], m, num_samples, dtype=C.dtype, generator=generator).to(C.device)
        draws = (A @ eps).permute(2, 1, 0)  # (s, m, k')
        draws = draws + (self.mean if multi else self.mean[:, None])
        return draws if multi else draws[..., 0]

    def to_gpytorch(self):
        """The same posterior as a ``gpytorch.distributions.MultivariateNormal`` (single output)
        or a batch of them (k outputs: batch shape (k,), event shape (m,))."""
        mean = self.mean if self.mean.dim() == 1 else self.mean.T
        return MultivariateNormal(mean, self.covariance_matrix)

    def __repr__(self) -> str:
        return f"NTKPosterior(mean: {tuple(self.mean.shape)}, variance: {tuple(self.variance.shape)})"


#: a fitted NTKRegressor (it imports this module, so it is not imported here)
Regressor = Any


def over_batches(reg: Regressor, x: Iterable) -> NTKPosterior:
    """:func:`at` batch by batch over a loader x, concatenated."""
    bar = validation.progress_bar(reg.lin.batches(x), reg.progress, "NTKRegressor.predict",
                                  inputs.num_batches(x))
    parts = [at(reg, xb) for xb in bar]
    mean = torch.cat([p.mean for p in parts])
    var = torch.cat([p.variance for p in parts])
    per_point = reg.output is not None and parts[0].noise.dim() == 1  # input-dependent noise (m,)
    noise = torch.cat([p.noise for p in parts]) if per_point else parts[0].noise

    def covariance() -> Tensor:
        with reg._lock:
            return at(reg, reg.lin.check_input(x, "x")).covariance_matrix

    return NTKPosterior(mean, var, noise, covariance)


def at(reg: Regressor, x: Tensor) -> NTKPosterior:
    """The posterior of a fitted NTKRegressor ``reg`` at inputs x (m, *features): mean, latent and
    noise variance in data units, the covariance on demand (checked against the memory limit)."""
    lin, st, lock = reg.lin, reg._state, reg._lock
    xs = lin.check_input(x, "x")
    outputs, sd, h, model, design = reg._outputs_, reg._sd, reg._h, reg._model, reg._design
    f = lin.forward(xs)[:, outputs].to(F64).T if offset_uses_network(model.mean) else None
    prior = f if f is not None else 0.0
    m_std, var_std = plan.predict_chunked(st, lin.memory_budget, xs)
    if h.slope is None:
        mean = prior + reg._mu[:, None] + sd[:, None] * (h.constant[:, None] + m_std)
    else:
        Hs = design.columns(f, xs.shape[0], len(outputs), m_std)
        mean = prior + reg._mu[:, None] + sd[:, None] * ((Hs @ h.beta[..., None])[..., 0] + m_std)
    var = var_std.clamp_min(0) * sd[:, None] ** 2
    noise = st.noise_at(xs) * (sd**2)[:, None] if model.source_noise else h.noise * sd**2

    def covariance() -> Tensor:
        with lock:
            plan.check_covariance(st, xs.shape[0], reg.memory_limit)
            _, cov = st.predict(xs, full_cov=True)
        cov = cov * (sd**2)[:, None, None]
        return cov[0] if reg.output is not None else cov

    if reg.output is not None:
        return NTKPosterior(mean[0], var[0], noise[0], covariance)
    return NTKPosterior(mean.T, var.T, noise, covariance)
