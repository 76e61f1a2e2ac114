"""Independent references for the likelihoods: torch.distributions log-probabilities, autograd
Hessians and GenericLikelihoods written without fntk's named classes (float64)."""

import math

import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian
from torch.distributions import Bernoulli as DBernoulli
from torch.distributions import Categorical as DCategorical
from torch.distributions import Normal, Poisson

from fntk import likelihoods as L

N = 5
D64 = torch.float64


def data(name, k, g):
    """(likelihood, reference log-prob function (f_i, y_i) -> scalar, f (N, k), y)."""
    f = torch.randn(N, k, generator=g, dtype=D64)
    if name == "gaussian":
        sigma = torch.rand(k, generator=g, dtype=D64) + 0.5
        return (
            L.Gaussian(sigma),
            lambda fi, yi: Normal(fi, sigma).log_prob(yi).sum(),
            f,
            torch.randn(N, k, dtype=D64),
        )
    if name == "hetero_softplus":
        return (
            L.HeteroscedasticGaussian("softplus"),
            _het_logp(F.softplus),
            f,
            torch.randn(N, k // 2, dtype=D64),
        )
    if name == "hetero_exp":
        return L.HeteroscedasticGaussian("exp"), _het_logp(torch.exp), f, torch.randn(N, k // 2, dtype=D64)
    if name == "categorical":
        return (
            L.Categorical(),
            lambda fi, yi: DCategorical(logits=fi).log_prob(yi),
            f,
            torch.randint(0, k, (N,)),
        )
    if name == "bernoulli":
        y = torch.randint(0, 2, (N, k)).to(D64)
        return L.Bernoulli(), lambda fi, yi: DBernoulli(logits=fi).log_prob(yi).sum(), f, y
    if name == "poisson":
        y = torch.randint(0, 6, (N, k)).to(D64)
        return L.Poisson(), lambda fi, yi: Poisson(fi.exp()).log_prob(yi).sum(), f, y
    raise KeyError(name)


def _het_logp(link):
    def logp(fi, yi):
        d = fi.shape[0] // 2
        return Normal(fi[:d], link(fi[d:]).sqrt()).log_prob(yi).sum()

    return logp


CANONICAL = [("gaussian", 3), ("categorical", 4), ("bernoulli", 1), ("bernoulli", 3), ("poisson", 2)]
HETERO = [("hetero_softplus", 2), ("hetero_exp", 4)]


def fisher_reference(name, logp, f, y):
    """Independent H_i: the NLL Hessian (canonical families), or for the heteroscedastic Gaussian
    E_y[∇²nll] by two-point Gauss-Hermite quadrature y = m ± √v (exact: ∇²nll is quadratic in y)."""
    out = []
    for i in range(f.shape[0]):
        if name.startswith("hetero"):
            d = f.shape[1] // 2
            link = F.softplus if name.endswith("softplus") else torch.exp
            m, s = f[i, :d], link(f[i, d:]).sqrt()
            Hs = [hessian(lambda fi, yy=m + sign * s: -logp(fi, yy), f[i]) for sign in (1, -1)]
            out.append(0.5 * (Hs[0] + Hs[1]))
        else:
            out.append(hessian(lambda fi, yi=y[i]: -logp(fi, yi), f[i]))
    return torch.stack(out)


def generic_for(name, k):
    """A GenericLikelihood written independently of fntk's named classes."""
    if name == "gaussian":
        return lambda sigma: L.GenericLikelihood(
            lambda fi, yi: (
                0.5 * ((yi - fi) / sigma) ** 2 + torch.log(sigma) + 0.5 * math.log(2 * math.pi)
            ).sum()
        )
    if name == "categorical":
        return L.GenericLikelihood(lambda fi, yi: F.cross_entropy(fi[None], yi[None]), num_outputs=k)
    if name == "bernoulli":
        return L.GenericLikelihood(lambda fi, yi: F.binary_cross_entropy_with_logits(fi, yi, reduction="sum"))
    if name == "poisson":
        return L.GenericLikelihood(lambda fi, yi: (fi.exp() - yi * fi + torch.lgamma(yi + 1)).sum())
    link = F.softplus if name.endswith("softplus") else torch.exp

    def nll(fi, yi):
        d = fi.shape[0] // 2
        v = link(fi[d:])
        return (0.5 * torch.log(2 * math.pi * v) + 0.5 * (yi - fi[:d]) ** 2 / v).sum()

    return L.GenericLikelihood(nll, inverse_link=lambda f: f)
