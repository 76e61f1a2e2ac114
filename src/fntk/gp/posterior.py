"""The predictive distribution returned by :meth:`fntk.NTKRegressor.predict`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from gpytorch.distributions import MultivariateNormal
from torch import Tensor

from fntk import validation
from fntk.linalg import safe_cholesky


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
        """Joint samples of f(x*) (or of y* with ``predictive=True``): (s, m), or (s, m, k)."""
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
        L = safe_cholesky(0.5 * (C + C.mT), "the posterior covariance")
        eps = torch.randn(C.shape[0], m, num_samples, dtype=C.dtype, generator=generator).to(C.device)
        draws = (L @ eps).permute(2, 1, 0)  # (s, m, k')
        draws = draws + (self.mean if multi else self.mean[:, None])
        return draws if multi else draws[..., 0]

    def to_gpytorch(self):
        """The same posterior as a ``gpytorch.distributions.MultivariateNormal`` (single output)
        or a batch of them (k outputs: batch shape (k,), event shape (m,))."""
        mean = self.mean if self.mean.dim() == 1 else self.mean.T
        return MultivariateNormal(mean, self.covariance_matrix)

    def __repr__(self) -> str:
        return f"NTKPosterior(mean: {tuple(self.mean.shape)}, variance: {tuple(self.variance.shape)})"
