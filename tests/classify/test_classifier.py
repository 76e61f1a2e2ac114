"""LinearizedClassifier: MAP, Laplace, VI on the linearized network, against dense float64 references.

The references here form explicit Jacobians with tests/reference.py (plain autograd) and do their
own Newton iterations and covariance algebra, so nothing of fntk's solvers is reused.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fntk
from fntk import LinearizedClassifier
from fntk.classify import NotFittedError
from fntk.ntk import cached_kernels

from classify_reference import DenseReference, _data, _probs
from models import make, tanh_mlp
from reference import assert_same_fingerprint, dense_jacobian, eval_forward, fingerprint

DT = torch.float64
SPACES = [("function", "auto"), ("weight", "dense"), ("weight", "lowrank")]


def _fit(model, x, y, space, cov, **kw):
    kw.setdefault("tol", 1e-10)
    return LinearizedClassifier(model, space=space, covariance=cov, rank=10_000, **kw).fit(x, y)


# ------------------------------------------------------------------------------------------ MAP
@pytest.mark.parametrize(
    "space,cov,prior_mean,k",
    [(s, c, m, k) for s, c in SPACES[:2] for m in ("theta", "zero") for k in (3, 1)]
    + [("weight", "lowrank", "zero", 3)],  # matrix-free Newton-CG: slow per product, one case
)
def test_map_is_stationary(space, cov, prior_mean, k):
    torch.manual_seed(1)
    model = tanh_mlp(d_in=3, width=6, k=k).to(DT)
    x, y = _data(n=20, k=k, seed=2)
    lam = 0.7
    clf = _fit(model, x, y, space, cov, inference="map", prior_precision=lam, prior_mean=prior_mean)
    assert clf.converged_ and clf.grad_norm_ <= 1e-6
    ref = DenseReference(model, x, y, lam, mu0_zero=prior_mean == "zero")
    w = clf.weights()
    assert float(ref.gradient(w).norm()) <= 1e-6  # independent gradient, from the dense Jacobian
    torch.testing.assert_close(w, ref.w, atol=1e-7, rtol=1e-7)


# ------------------------------------------------------------------------------------------ Laplace
@pytest.mark.parametrize("space,cov", SPACES)
def test_linear_model_laplace_equals_dense_logistic_regression(space, cov):
    """For f(x) = W x + b the linearization is exact: Laplace is Bayesian logistic regression."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    x, y = _data(n=30, d=4, seed=3)
    xs, _ = _data(n=7, d=4, seed=4)
    lam = 0.5
    clf = _fit(model, x, y, space, cov, prior_precision=lam)
    # the reference: explicit multinomial-logistic design, weight rows then bias
    n, C, d = 30, 3, 4
    X = torch.cat([torch.kron(torch.eye(C, dtype=DT), x[i][None]) for i in range(n)]).reshape(n, C, C * d)
    Jr = torch.cat([X, torch.eye(C, dtype=DT).expand(n, C, C)], dim=2)
    torch.testing.assert_close(Jr, dense_jacobian(model, x))  # the design is the Jacobian
    ref = DenseReference(model, x, y, lam)
    torch.testing.assert_close(clf.weights(), ref.w, atol=1e-8, rtol=1e-8)
    mean, covar = clf.predict_f(xs)
    rmean, rcov = ref.predictive(xs)
    torch.testing.assert_close(mean, rmean, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(covar, rcov, atol=1e-8, rtol=1e-7)
    assert clf.log_marginal_likelihood() == pytest.approx(ref.log_evidence(), rel=1e-8)


@pytest.mark.parametrize("space,cov", SPACES[:2])
def test_marglik_maximises_the_laplace_evidence(space, cov):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    x, y = _data(n=40, d=4, seed=5)
    clf = _fit(model, x, y, space, cov)
    lam = clf.prior_precision_
    assert clf.marglik_history_ and 1e-3 < lam < 1e3

    def ev(lam_):
        return DenseReference(model, x, y, lam_).log_evidence()

    assert clf.log_marginal_likelihood() == pytest.approx(ev(lam), rel=1e-8)
    eps = 1e-3  # the reference evidence has its maximum there: within 2e-3 in log λ
    e0, e_minus, e_plus = ev(lam), ev(lam * math.exp(-eps)), ev(lam * math.exp(eps))
    slope, curvature = (e_plus - e_minus) / (2 * eps), (e_plus - 2 * e0 + e_minus) / eps**2
    assert curvature < 0 and abs(slope / curvature) < 2e-3
    assert ev(lam) >= max(ev(lam * 0.8), ev(lam * 1.25))
    # MacKay's fixed point γ/‖w − μ₀‖² (which ignores the change of H with w) is near, not equal
    ref = DenseReference(model, x, y, lam)
    gamma = ref.theta.shape[0] - lam * torch.trace(ref.cov)
    assert float(gamma / (ref.w - ref.mu0).square().sum()) == pytest.approx(lam, rel=0.5)


def test_kernel_pool_gives_the_same_fit():
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=6, k=3).to(DT)
    x, y = _data(n=12, seed=18)
    xs, _ = _data(n=6, seed=19)
    a = LinearizedClassifier(model, space="function")
    ref = a.fit(x, y).predict_proba(xs)
    with fntk.ntk.kernel_pool(a.lin, torch.cat([xs, x, x[:3]])) as pool:
        got = a.fit(x[:8], y[:8]).fit(x, y).predict_proba(xs)  # subsets: served by the pool
    assert pool.computed == 0 and pool.served >= 3
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("space,cov", SPACES)
@pytest.mark.parametrize("k", [3, 1])
def test_probit_predictive_equals_dense_jacobian_computation(space, cov, k):
    torch.manual_seed(3)
    model = tanh_mlp(d_in=3, width=5, k=k).to(DT)
    x, y = _data(n=15, k=k, seed=6)
    xs, _ = _data(n=9, seed=7)
    lam = 1.3
    clf = _fit(model, x, y, space, cov, prior_precision=lam, link_approx="probit")
    ref = DenseReference(model, x, y, lam)
    mean, covar = ref.predictive(xs)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * covar.diagonal(dim1=1, dim2=2))
    expected = _probs(mean * kappa)
    probs = clf.predict_proba(xs)
    assert probs.shape == (9, max(k, 2))
    torch.testing.assert_close(probs, expected, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(clf.predict(xs), expected.argmax(-1))


def test_mc_predictive_matches_dense_monte_carlo():
    torch.manual_seed(3)
    model = tanh_mlp(d_in=3, width=5, k=3).to(DT)
    x, y = _data(n=15, seed=6)
    xs, _ = _data(n=9, seed=7)
    clf = _fit(model, x, y, "function", "auto", prior_precision=0.3, link_approx="mc", num_samples=20_000)
    mean, covar = DenseReference(model, x, y, 0.3).predictive(xs)
    g = torch.Generator().manual_seed(11)
    f = torch.distributions.MultivariateNormal(mean, covar + 1e-12 * torch.eye(3, dtype=DT)).sample((20_000,))
    torch.testing.assert_close(clf.predict_proba(xs), torch.softmax(f, -1).mean(0), atol=0.01, rtol=0)
    del g


@pytest.mark.filterwarnings("ignore:MAP solve stopped")  # ‖∇Ψ‖ = λ‖w − θ̂‖ is rounding · 1e12
@pytest.mark.parametrize("inference", ["map", "laplace", "vi"])
@pytest.mark.parametrize("space", ["function", "weight"])
def test_infinite_prior_precision_gives_the_source_network(inference, space):
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=6, k=3).to(DT)
    x, y = _data(n=12, seed=8)
    xs, _ = _data(n=10, seed=9)
    clf = LinearizedClassifier(model, inference=inference, prior_precision=1e12, space=space).fit(x, y)
    torch.testing.assert_close(
        clf.predict_proba(xs), torch.softmax(eval_forward(model, xs), -1), atol=1e-6, rtol=0
    )


def test_last_layer_subset_function_equals_weight_space():
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=6, k=3).to(DT)
    last = ["4.weight", "4.bias"]
    x, y = _data(n=10, seed=10)
    xs, _ = _data(n=5, seed=11)
    a = _fit(model, x, y, "function", "auto", params=last)
    b = _fit(model, x, y, "weight", "dense", params=last)
    assert a.lin.num_params == 21 and a.space_ == "function" and b.space_ == "weight-dense"
    assert a.prior_precision_ == pytest.approx(b.prior_precision_, rel=1e-6)
    torch.testing.assert_close(a.predict_proba(xs), b.predict_proba(xs), atol=1e-8, rtol=1e-7)
    ref = DenseReference(model, x, y, a.prior_precision_, names=last)
    torch.testing.assert_close(a.weights(), ref.w, atol=1e-7, rtol=1e-7)


def test_auto_space_follows_nk_versus_p():
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=6, k=3).to(DT)  # p = 93
    x, y = _data(n=10, seed=0)
    assert LinearizedClassifier(model, prior_precision=1.0).fit(x, y).space_ == "function"  # nk = 30
    x, y = _data(n=60, seed=0)
    assert LinearizedClassifier(model, prior_precision=1.0).fit(x, y).space_ == "weight-dense"  # nk = 180


# ------------------------------------------------------------------------------------------ VI
def test_vi_elbo_increases():
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=6, k=3).to(DT)
    x, y = _data(n=30, seed=12, model=model)
    clf = LinearizedClassifier(model, inference="vi", prior_precision=1.0, vi_init="prior", vi_max_iter=40)
    clf.fit(x, y)
    h = clf.elbo_history_
    assert len(h) > 3 and h[-1] > h[0] + 1.0
    assert all(b >= a - 1e-9 for a, b in zip(h, h[1:]))  # L-BFGS on a fixed-sample ELBO: monotone


@pytest.mark.parametrize("family", ["subspace", "meanfield"])
def test_vi_mean_approaches_map_as_data_grows(family):
    torch.manual_seed(0)
    model = nn.Linear(3, 3).to(DT)
    gaps = []
    for n in (10, 60, 360):
        x, y = _data(n=n, seed=13, model=model)
        kw = dict(prior_precision=1.0, space="weight", vi_init="prior", vi_samples=64)
        m = LinearizedClassifier(model, inference="map", **kw).fit(x, y).weights()
        v = LinearizedClassifier(model, inference="vi", vi_family=family, **kw).fit(x, y).weights()
        gaps.append(float((v - m).norm() / (m - model.weight.new_tensor(0)).norm().clamp_min(1e-12)))
    assert gaps[2] < gaps[1] < gaps[0] and gaps[2] < 0.05, gaps


def test_vi_function_and_weight_space_agree_when_subspace_is_complete():
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=4, k=3).to(DT)
    x, y = _data(n=8, seed=14)
    xs, _ = _data(n=5, seed=15)
    kw = dict(inference="vi", prior_precision=2.0, vi_samples=64, link_approx="probit")
    a = LinearizedClassifier(model, space="function", **kw).fit(x, y)
    b = LinearizedClassifier(model, space="weight", **kw).fit(x, y)
    assert a.vi_rank_ == b.vi_rank_ == 24  # rank J(X) = n k < p
    torch.testing.assert_close(a.predict_proba(xs), b.predict_proba(xs), atol=0.02, rtol=0)
    assert math.isfinite(a.elbo_) and math.isfinite(b.elbo_)


# ------------------------------------------------------------------------------------------ misc
def test_bernoulli_single_logit_and_cached_kernels():
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=6, k=1).to(DT)
    x, y = _data(n=16, k=1, seed=16)
    xs, _ = _data(n=4, seed=17)
    a = LinearizedClassifier(model).fit(x, y)
    with cached_kernels():
        b = LinearizedClassifier(a.lin).fit(x, y)
        c = LinearizedClassifier(a.lin, inference="vi").fit(x, y)
        pb, pc = b.predict_proba(xs), c.predict_proba(xs)
    torch.testing.assert_close(a.predict_proba(xs), pb)
    assert pb.shape == pc.shape == (4, 2) and torch.allclose(pc.sum(-1), torch.ones(4, dtype=DT))


@pytest.mark.parametrize("inference", ["map", "laplace", "vi"])
def test_model_is_never_modified(inference):
    model, x, xs = make("cnn")
    model.train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.register_forward_hook(lambda *a: None)
    before = fingerprint(model)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    lam = "marglik" if inference == "map" else 1.0
    clf = LinearizedClassifier(model, inference=inference, prior_precision=lam).fit(x, y)
    clf.predict_proba(xs)
    clf.predict(xs)
    assert_same_fingerprint(before, fingerprint(model))


def test_clear_errors():
    model = tanh_mlp(d_in=3, width=4, k=3).to(DT)
    x, y = _data(n=6, seed=0)
    clf = LinearizedClassifier(model, prior_precision=1.0)
    with pytest.raises(TypeError, match="integer class labels.*float"):
        clf.fit(x, y.to(DT))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*max 3"):
        clf.fit(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*min -1"):
        clf.fit(x, torch.tensor([0, 1, 2, -1, 0, 1]))
    with pytest.raises(ValueError, match=r"y has 5 labels but x has 6 points"):
        clf.fit(x, y[:5])
    with pytest.raises(ValueError, match="1-d"):
        clf.fit(x, y[:, None])
    with pytest.raises(ValueError, match=r"inference must be one of \['map', 'laplace', 'vi'\], got 'ep'"):
        LinearizedClassifier(model, inference="ep")
    for bad in ("evidence", -1.0, 0, float("nan")):
        with pytest.raises(ValueError, match="prior_precision must be 'marglik', 'cv' or a positive float"):
            LinearizedClassifier(model, prior_precision=bad)
    with pytest.raises(ValueError, match="link_approx must be one of"):
        LinearizedClassifier(model, link_approx="laplace-bridge")
    with pytest.raises(NotFittedError, match="not fitted yet"):
        clf.predict_proba(x)
    with pytest.raises(ValueError, match="not fitted yet"):  # NotFittedError is a ValueError
        clf.predict(x)
    with pytest.raises(TypeError, match="model must be"):
        LinearizedClassifier("net")
    binary = LinearizedClassifier(tanh_mlp(d_in=3, width=4, k=1).to(DT), prior_precision=1.0)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        binary.fit(x, torch.tensor([0, 1, 2, 0, 1, 0]))
