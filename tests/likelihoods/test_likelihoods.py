"""Likelihoods against torch.distributions log-probabilities and autograd Hessians (float64)."""


import pytest
import torch
from torch.autograd.functional import hessian

from fntk import likelihoods as L

from likelihood_reference import CANONICAL, HETERO, N, data, fisher_reference, generic_for
from reference import rel_err

TOL = 1e-10
D64 = torch.float64


@pytest.mark.parametrize("name,k", CANONICAL + HETERO)
def test_nll_hessian_factors_kl(name, k):
    g = torch.Generator().manual_seed(3)
    lik, logp, f, y = data(name, k, g)
    nll_ref = -torch.stack([logp(f[i], y[i]) for i in range(N)])
    assert rel_err(lik.nll(f, y), nll_ref) <= TOL
    H_ref = fisher_reference(name, logp, f, y)
    H = lik.hessian(f)  # y optional: H does not depend on it
    assert H.shape == (N, k, k)
    assert rel_err(H, H_ref) <= TOL
    assert rel_err(lik.hessian(f, y), H_ref) <= TOL
    U = torch.randn(N, k, 3, generator=g, dtype=D64)
    assert rel_err(lik.hessian_matmul(f, U), H_ref @ U) <= TOL
    assert rel_err(lik.hessian_matmul(f, U[..., 0]), (H_ref @ U)[..., 0]) <= TOL
    Q, lam = lik.hessian_factors(f)
    assert rel_err(Q @ torch.diag_embed(lam) @ Q.mT, H_ref) <= TOL
    assert torch.linalg.eigvalsh(H).min() >= -1e-12  # PSD (the Fisher)
    # KL(p_f ‖ p_f) = 0, and its Hessian in the second argument is the same Fisher
    f2 = f + 0.3 * torch.randn(N, k, generator=g, dtype=D64)
    assert lik.kl(f, f).abs().max() <= 1e-12 and bool((lik.kl(f, f2) > 0).all())
    for i in range(2):
        Hk = hessian(lambda fi, i=i: lik.kl(f[i : i + 1], fi[None])[0], f[i])
        assert rel_err(Hk, H_ref[i]) <= 1e-9


@pytest.mark.parametrize("name,k", CANONICAL + HETERO + [("soft_categorical", 4)])
def test_newton_terms(name, k):
    """pure_terms (closed forms where a likelihood has them): the NLL, its autograd gradient and
    a root of the Hessian; soft labels (class probabilities, not summing to one) too."""
    g = torch.Generator().manual_seed(6)
    lik, logp, f, y = data("categorical" if name == "soft_categorical" else name, k, g)
    if name == "soft_categorical":
        y = torch.rand(N, k, generator=g, dtype=D64)
        nll_ref = -(y * torch.log_softmax(f, -1)).sum(-1)
    else:
        nll_ref = -torch.stack([logp(f[i], y[i]) for i in range(N)])
    ff = f.clone().requires_grad_(True)
    grad_ref = torch.autograd.grad(lik.pure_nll(ff, y).sum(), ff)[0]
    nll, grad, root = lik.pure_terms(f, y)
    assert rel_err(nll, nll_ref) <= TOL and rel_err(grad, grad_ref) <= TOL
    assert rel_err(root @ root.mT, lik.hessian(f)) <= TOL
    assert lik.pure_terms(f, y, root=False)[2] is None


def test_inverse_links():
    f = torch.randn(N, 4, dtype=D64)
    assert torch.equal(L.Gaussian().inverse_link(f), f)
    assert rel_err(L.Categorical().inverse_link(f), torch.softmax(f, -1)) <= TOL
    assert rel_err(L.Bernoulli().inverse_link(f), torch.sigmoid(f)) <= TOL
    assert rel_err(L.Poisson().inverse_link(f), f.exp()) <= TOL
    mv = L.HeteroscedasticGaussian("exp").inverse_link(f)
    assert rel_err(mv, torch.cat([f[:, :2], f[:, 2:].exp()], 1)) <= TOL
    assert rel_err(L.Bernoulli().inverse_link(f[:, 0]), torch.sigmoid(f[:, :1])) <= TOL  # (n,) accepted


# ---------------------------------------------------------------------- the generic likelihood
@pytest.mark.parametrize("name,k", CANONICAL + HETERO)
def test_generic_matches_named(name, k):
    g = torch.Generator().manual_seed(4)
    lik, _, f, y = data(name, k, g)
    gen = generic_for(name, k)
    if name == "gaussian":
        gen = gen(lik.sigma)
    assert rel_err(gen.nll(f, y), lik.nll(f, y)) <= TOL
    if name.startswith("hetero"):  # the named one is the Fisher: E_y of the generic NLL Hessian
        d = k // 2
        m, v = lik.inverse_link(f)[:, :d], lik.inverse_link(f)[:, d:]
        H = 0.5 * (gen.hessian(f, m + v.sqrt()) + gen.hessian(f, m - v.sqrt()))
    else:
        H = gen.hessian(f, y)
    assert rel_err(H, lik.hessian(f)) <= TOL
    U = torch.randn(N, k, 2, generator=g, dtype=D64)
    assert rel_err(gen.hessian_matmul(f, U, y), gen.hessian(f, y) @ U) <= TOL
    Q, lam = gen.hessian_factors(f, y)
    assert rel_err(Q @ torch.diag_embed(lam) @ Q.mT, gen.hessian(f, y)) <= TOL


# ---------------------------------------------------------------------- errors
def test_errors_name_argument_and_shapes():
    f = torch.randn(N, 3, dtype=D64)
    with pytest.raises(ValueError, match=r"y has labels outside \[0, 3\)"):
        L.Categorical().nll(f, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"y must be int labels of shape \(5,\)"):
        L.Categorical().nll(f, torch.zeros(N, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="k >= 2"):
        L.Categorical().hessian(f[:, :1])
    with pytest.raises(ValueError, match=r"y must have shape \(5, 3\)"):
        L.Gaussian().nll(f, torch.randn(N, 2))
    with pytest.raises(ValueError, match="one target per point"):
        L.Gaussian().nll(f, torch.randn(4, 3))
    with pytest.raises(ValueError, match="even number of outputs"):
        L.HeteroscedasticGaussian().hessian(f)
    with pytest.raises(ValueError, match="link must be one of"):
        L.HeteroscedasticGaussian("square")
    with pytest.raises(ValueError, match="sigma must be a positive"):
        L.Gaussian(-1.0)
    with pytest.raises(ValueError, match="sigma has 2 entries"):
        L.Gaussian(torch.ones(2)).hessian(f)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        L.Bernoulli().nll(f, torch.full((N, 3), 2.0))
    with pytest.raises(ValueError, match="non-negative"):
        L.Poisson().nll(f, -torch.ones(N, 3))
    with pytest.raises(TypeError, match="f must be floating point"):
        L.Poisson().hessian(torch.ones(N, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"U must have shape \(5, 3\) or \(5, 3, r\)"):
        L.Poisson().hessian_matmul(f, torch.randn(N, 2))
    gen = L.GenericLikelihood(lambda fi, yi: ((fi - yi) ** 2).sum(), num_outputs=3)
    with pytest.raises(ValueError, match="y is required by the generic likelihood"):
        gen.hessian(f)
    with pytest.raises(ValueError, match="expects k=3 outputs, got k=2"):
        gen.hessian(f[:, :2], f[:, :2])
    with pytest.raises(NotImplementedError, match="no KL divergence"):
        gen.kl(f, f)
    with pytest.raises(TypeError, match="nll must be callable"):
        L.GenericLikelihood(3)


def test_likelihoods_by_name():
    for name, cls in L.NAMES.items():
        got = L.resolve(name)
        assert type(got) is cls
    assert type(L.resolve("Heteroscedastic-Gaussian")) is L.HeteroscedasticGaussian
    g = L.Gaussian(0.3)
    assert L.resolve(g) is g
    f = torch.randn(4, 3, dtype=D64)
    y = torch.randint(0, 3, (4,))
    assert torch.equal(L.resolve("categorical").nll(f, y), L.Categorical().nll(f, y))
    with pytest.raises(ValueError, match=r"unknown likelihood 'gauss'.*'categorical'"):
        L.resolve("gauss")
    with pytest.raises(TypeError, match="must be a fntk.likelihoods.Likelihood or one of the names"):
        L.resolve(3)
