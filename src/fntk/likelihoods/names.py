"""Likelihoods by name: ``"gaussian"``, ``"heteroscedastic_gaussian"``, ``"categorical"``,
``"bernoulli"``, ``"poisson"`` (as laplace-torch and GPyTorch users pass them)."""

from __future__ import annotations

from fntk.likelihoods.base import Likelihood
from fntk.likelihoods.bernoulli import Bernoulli
from fntk.likelihoods.categorical import Categorical
from fntk.likelihoods.gaussian import Gaussian
from fntk.likelihoods.heteroscedastic import HeteroscedasticGaussian
from fntk.likelihoods.poisson import Poisson

#: name → class; each is built with its default hyperparameters (Gaussian: σ = 1)
NAMES: dict[str, type[Likelihood]] = {
    "gaussian": Gaussian,
    "heteroscedastic_gaussian": HeteroscedasticGaussian,
    "categorical": Categorical,
    "bernoulli": Bernoulli,
    "poisson": Poisson,
}


def resolve(likelihood: Likelihood | str, name: str = "likelihood") -> Likelihood:
    """A :class:`Likelihood` as is, or the named one with default hyperparameters; a clear error
    listing the valid names (or naming the type that came) otherwise."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        key = likelihood.strip().lower().replace("-", "_").replace(" ", "_")
        if key in NAMES:
            return NAMES[key]()
        raise ValueError(
            f"{name}: unknown likelihood {likelihood!r}; valid names are {sorted(NAMES)} (or pass a "
            "fntk.likelihoods.Likelihood object, e.g. Gaussian(sigma=0.1))"
        )
    raise TypeError(
        f"{name} must be a fntk.likelihoods.Likelihood or one of the names {sorted(NAMES)}, got "
        f"{type(likelihood).__name__}"
    )


__all__ = ["NAMES", "resolve"]
