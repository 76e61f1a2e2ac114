"""Likelihoods by name wherever a likelihood is accepted (GGNOperator, fntk.curvature's ggn_diagonal and
ggn_dense, the VI building blocks): a name gives bit-for-bit the numbers of the default object, and
those numbers are the dense float64 Σ_i J_iᵀ H_i J_i; unknown names are refused listing the valid ones."""

from __future__ import annotations

import pytest
import torch

import fntk
from fntk import curvature
from fntk.classify import meanfield, vi
from fntk.likelihoods import NAMES

from models import tanh_mlp
from reference import dense_jacobian, eval_forward, rel_err

DT = torch.float64
OUTPUTS = {"gaussian": 2, "heteroscedastic_gaussian": 2, "categorical": 3, "bernoulli": 1, "poisson": 1}


def _setup(name: str, n: int = 9):
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=4, k=OUTPUTS[name]).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    return model, fntk.Linearized(model), x


@pytest.mark.parametrize("name", sorted(NAMES))
def test_a_name_gives_the_numbers_of_its_object(name):
    model, lin, x = _setup(name)
    obj = NAMES[name]()
    V = torch.randn(lin.num_params, 4, dtype=DT)
    G_name = curvature.GGNOperator(lin, x, name)
    assert type(G_name.likelihood) is type(obj)
    assert torch.equal(G_name @ V, curvature.GGNOperator(lin, x, obj) @ V)
    assert torch.equal(G_name.diagonal(), curvature.GGNOperator(lin, x, obj).diagonal())
    assert torch.equal(curvature.ggn_diagonal(lin, x, name), curvature.ggn_diagonal(lin, x, obj))
    dense = curvature.ggn_dense(lin, x, name, reduction="mean")
    assert torch.equal(dense, curvature.ggn_dense(lin, x, obj, reduction="mean"))
    # and they are the GGN: the dense float64 reference Σ_i J_iᵀ H_i J_i (plain-autograd J)
    J = dense_jacobian(model, x)
    H = obj.hessian(eval_forward(model, x))
    ref = torch.einsum("nkp,nkl,nlq->pq", J, H, J)
    assert rel_err(dense, ref / x.shape[0]) < 1e-12
    assert rel_err(G_name @ V, ref @ V) < 1e-12


def test_names_with_the_second_order_methods_and_rebuilt_operators():
    _, lin, x = _setup("categorical")
    V = torch.randn(lin.num_params, 2, dtype=DT)
    for method in ("finite_difference", "autograd"):
        a = curvature.GGNOperator(lin, x, "Categorical", method=method)
        b = curvature.GGNOperator(lin, x, fntk.likelihoods.Categorical(), method=method)
        assert torch.equal(a @ V, b @ V)
    G = curvature.GGNOperator(lin, x, "categorical")
    assert torch.equal((G + G) @ V, 2 * (G @ V))  # linear_operator rebuilds it from its kwargs


def test_vi_building_blocks_take_names():
    g = torch.Generator().manual_seed(1)
    n, k, r = 8, 3, 4
    y = torch.randint(0, k, (n,), generator=g)
    m0, Phi = torch.randn(n, k, dtype=DT, generator=g), torch.randn(n, k, r, dtype=DT, generator=g)
    a = vi.fit_vi("categorical", y, m0, Phi, 1.0, num_samples=4, max_iter=5)
    b = vi.fit_vi(fntk.likelihoods.Categorical(), y, m0, Phi, 1.0, num_samples=4, max_iter=5)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.scale, b.scale) and a.elbo == b.elbo
    u = torch.zeros(r, dtype=DT)
    for x1, x2 in zip(vi.laplace_init("categorical", y, m0, Phi, 1.0, u),
                      vi.laplace_init(fntk.likelihoods.Categorical(), y, m0, Phi, 1.0, u)):
        assert torch.equal(x1, x2)
    _, lin, x = _setup("categorical")
    w, y9 = lin.theta.to(DT), torch.randint(0, k, (9,), generator=g)
    s1 = meanfield.diagonal_laplace_scale(lin, x, y9, "categorical", w, 1.0)
    s2 = meanfield.diagonal_laplace_scale(lin, x, y9, fntk.likelihoods.Categorical(), w, 1.0)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("call", [
    lambda lin, x, lik: curvature.GGNOperator(lin, x, lik),
    lambda lin, x, lik: curvature.ggn_diagonal(lin, x, lik),
    lambda lin, x, lik: curvature.ggn_dense(lin, x, lik),
], ids=["GGNOperator", "ggn_diagonal", "ggn_dense"])
def test_unknown_names_are_refused_listing_the_valid_ones(call):
    _, lin, x = _setup("categorical")
    valid = r"\['bernoulli', 'categorical', 'gaussian', 'heteroscedastic_gaussian', 'poisson'\]"
    with pytest.raises(ValueError, match=r"unknown likelihood 'softmax'; valid names are " + valid):
        call(lin, x, "softmax")
    with pytest.raises(TypeError, match="must be a fntk.likelihoods.Likelihood or one of the names"):
        call(lin, x, 3)
