r"""Per-example likelihoods: negative log-likelihoods and their output-space curvature.

A likelihood p(y | f) is a distribution over a target y given the network output f (k,) of one
point. For a batch, f is (n, k). Each likelihood gives

- ``nll(f, y)``              (n,)       −log p(y_i | f_i), per example;
- ``hessian(f, y)``          (n, k, k)  H_i, the output-space curvature used by the generalized
                                        Gauss-Newton matrix G = Σ_i J_iᵀ H_i J_i;
- ``hessian_matmul(f, U, y)`` (n, k, r) H_i U_i  (U (n, k, r) or (n, k) → (n, k));
- ``hessian_factors(f, y)``  (Q (n, k, m), λ (n, m)) with H_i = Q_i diag(λ_i) Q_iᵀ;
- ``inverse_link(f)``        (n, k)     the mean of p(y | f) (for the predictive);
- ``kl(f_ref, f)``           (n,)       KL(p(·|f_ref) ‖ p(·|f)), used by the finite-difference and
                                        autograd Fisher products of :mod:`fntk.curvature`.

For the named likelihoods H is the Fisher information of p(y | f) in the output f,

    H(f) = E_{y~p(·|f)}[∇_f log p ∇_f log pᵀ] = ∇²_{f'} KL(p(·|f) ‖ p(·|f'))|_{f'=f},

which is PSD and does not depend on y, so ``y`` is optional. For the canonical exponential
families (Gaussian with fixed σ, categorical, Bernoulli, Poisson with log link) it also equals
the Hessian ∇²_f nll(f, y). For the heteroscedastic Gaussian it is the Fisher in the (mean,
raw-variance) outputs (the NLL Hessian there is indefinite). :class:`GenericLikelihood` uses the
NLL Hessian ∇²_f nll(f, y) of a user function, taken by ``torch.func.hessian`` and vmapped over
points; it needs y.

Likelihoods are stateless apart from their hyperparameters; all methods are pure functions of
their tensor arguments (usable inside ``torch.func`` transforms through the ``pure_``-prefixed
versions, which skip validation).
"""

from fntk.likelihoods.base import Likelihood
from fntk.likelihoods.bernoulli import Bernoulli
from fntk.likelihoods.categorical import Categorical
from fntk.likelihoods.gaussian import Gaussian
from fntk.likelihoods.generic import GenericLikelihood
from fntk.likelihoods.heteroscedastic import HeteroscedasticGaussian
from fntk.likelihoods.names import NAMES, resolve
from fntk.likelihoods.poisson import Poisson

__all__ = [
    "Likelihood",
    "Gaussian",
    "HeteroscedasticGaussian",
    "Categorical",
    "Bernoulli",
    "Poisson",
    "GenericLikelihood",
    "NAMES",
    "resolve",
]
