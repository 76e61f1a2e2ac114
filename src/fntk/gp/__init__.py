"""Gaussian-process regression with the empirical NTK of a trained network.

- :class:`NTKRegressor`: fit / predict with learned hyperparameters, in function or weight space.
- :class:`NTKKernel`: a ``gpytorch.kernels.Kernel`` for ``gpytorch.models.ExactGP`` users.
"""

from fntk.gp.kernel import NTKKernel, NTKPredictionStrategy
from fntk.gp.posterior import NTKPosterior
from fntk.gp.regressor import NotFittedError, NTKRegressor

__all__ = ["NTKRegressor", "NTKPosterior", "NTKKernel", "NTKPredictionStrategy", "NotFittedError"]
