"""Gaussian-process regression with the empirical NTK of a trained network.

- :class:`NTKRegressor`: fit / predict with learned hyperparameters, in function or weight space;
  its model (prior mean, input kernel, per-layer scales, source noise: :class:`GPModel`) chosen
  automatically or given.
- :class:`NTKKernel`: a ``gpytorch.kernels.Kernel`` for ``gpytorch.models.ExactGP`` users.
"""

from fntk.gp.kernel import NTKKernel, NTKPredictionStrategy
from fntk.gp.models import GPModel, default_candidates
from fntk.gp.posterior import NTKPosterior
from fntk.gp.regressor import NotFittedError, NTKRegressor

__all__ = ["NTKRegressor", "NTKPosterior", "NTKKernel", "NTKPredictionStrategy", "NotFittedError", "GPModel",
           "default_candidates"]
