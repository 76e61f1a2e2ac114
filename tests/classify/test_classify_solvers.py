"""LinearizedClassifier: the L-BFGS MAP solver and mean-field VI, against dense float64 references.

The references form explicit Jacobians (tests/reference.py, plain autograd) and evaluate the
objective, ELBO and predictive moments directly; only the fixed ± noise draws are shared.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fntk
from fntk import LinearizedClassifier
from fntk.classify.vi import antithetic_normals

from classify_reference import DenseReference, _data
from models import tanh_mlp
from reference import assert_same_fingerprint, dense_jacobian, eval_forward, fingerprint

DT = torch.float64


# ------------------------------------------------------------------------------------------ L-BFGS
@pytest.mark.parametrize(
    "cov,prior_mean,k,batch",
    [
        ("dense", "theta", 3, 7),
        ("dense", "zero", 1, None),
        ("lowrank", "theta", 3, 6),
        ("lowrank", "zero", 1, 5),
    ],
)
def test_lbfgs_map_is_stationary_and_equals_the_dense_map(cov, prior_mean, k, batch):
    torch.manual_seed(1)
    model = tanh_mlp(d_in=3, width=6, k=k).to(DT)
    x, y = _data(n=20, k=k, seed=2)
    lam = 0.7
    clf = LinearizedClassifier(
        model,
        inference="map",
        prior_precision=lam,
        prior_mean=prior_mean,
        space="weight",
        covariance=cov,
        solver="lbfgs",
        batch_size=batch,
    ).fit(x, y)
    assert clf.space_ == f"weight-{cov}"
    assert clf.converged_ and clf.grad_norm_ <= 1e-6
    ref = DenseReference(model, x, y, lam, mu0_zero=prior_mean == "zero")
    w = clf.weights()
    assert float(ref.gradient(w).norm()) <= 1e-6  # independent gradient from the dense Jacobian
    torch.testing.assert_close(w, ref.w, atol=5e-6, rtol=0)  # ‖w − w*‖ ≤ ‖∇Ψ‖ / λ_min(P)
    # the objective decreases monotonically (up to its rounding, where the line search uses ∇Ψ only)
    objs = [o for o, _ in clf.map_history_]
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(objs, objs[1:]))


def test_lbfgs_laplace_and_marglik_agree_with_newton():
    torch.manual_seed(3)
    model = tanh_mlp(d_in=3, width=6, k=3).to(DT)
    x, y = _data(n=24, seed=4, model=model)
    xs, _ = _data(n=6, seed=5)
    kw = dict(inference="laplace", space="weight", covariance="dense", tol=1e-9)
    a = LinearizedClassifier(model, **kw).fit(x, y)
    b = LinearizedClassifier(model, solver="lbfgs", batch_size=5, **kw).fit(x, y)
    # ‖∇Ψ‖ ≤ 1e-9 is below where Ψ's decrease is resolved in float64: the derivative line search
    assert a.grad_norm_ <= 1e-9 and b.grad_norm_ <= 1e-9
    assert abs(a.prior_precision_ / b.prior_precision_ - 1) < 1e-6
    torch.testing.assert_close(b.predict_proba(xs), a.predict_proba(xs), atol=1e-9, rtol=0)


def test_lbfgs_callback_and_errors():
    model = tanh_mlp(d_in=3, width=4, k=3).to(DT)
    x, y = _data(n=10, seed=6)
    seen = []
    clf = LinearizedClassifier(model, inference="map", prior_precision=1.0, solver="lbfgs")
    clf.fit(x, y, callback=seen.append)
    assert [d["step"] for d in seen] == list(range(len(seen))) and seen[0]["stage"] == "map"
    assert seen[-1]["grad_norm"] == clf.grad_norm_ <= 1e-6
    assert clf.space_ == "weight-dense"  # auto: L-BFGS works on w
    with pytest.raises(ValueError, match="solver='lbfgs' optimises the weights.*space='weight'"):
        LinearizedClassifier(model, solver="lbfgs", space="function")
    with pytest.raises(ValueError, match=r"solver must be one of \['newton', 'lbfgs'\], got 'sgd'"):
        LinearizedClassifier(model, solver="sgd")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        LinearizedClassifier(model, solver="lbfgs", batch_size=0)


# ------------------------------------------------------------------------------------------ mean-field VI
def _nll(f, y):
    if f.shape[-1] == 1:
        return nn.functional.softplus(f[..., 0]) - y.to(DT) * f[..., 0]
    return -torch.log_softmax(f, -1).gather(-1, y[..., None])[..., 0]


def _dense_elbo(model, x, y, lam, mu0, m, s, xi):
    """The fixed-sample ELBO from the explicit Jacobian: logits N(f0 + J(m − θ̂), J diag(s²) Jᵀ)."""
    J, f0 = dense_jacobian(model, x), eval_forward(model, x)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    mean = f0 + torch.einsum("nkp,p->nk", J, m - theta)
    cov = torch.einsum("nkp,p,nlp->nkl", J, s.square(), J)
    k = cov.shape[-1]
    L = torch.linalg.cholesky(
        cov + (1e-9 * cov.diagonal(dim1=1, dim2=2).mean(-1) + 1e-12)[:, None, None] * torch.eye(k, dtype=DT)
    )
    f = mean[:, None] + torch.einsum("nkl,nsl->nsk", L, xi)
    ell = -_nll(f, y[:, None].expand(-1, xi.shape[1])).sum() / xi.shape[1]
    kl = 0.5 * (
        lam * (s.square().sum() + (m - mu0).square().sum())
        - m.numel() * (1 + torch.log(torch.tensor(lam, dtype=DT)))
        - 2 * torch.log(s).sum()
    )
    return ell - kl


@pytest.mark.parametrize("k,prior_mean", [(3, "theta"), (1, "zero")])
def test_meanfield_elbo_equals_dense_reference_and_increases(k, prior_mean):
    torch.manual_seed(7)
    model = tanh_mlp(d_in=3, width=5, k=k).to(DT)
    x, y = _data(n=18, k=k, seed=8)
    lam, S = 1.5, 16
    clf = LinearizedClassifier(
        model, inference="vi", vi_family="meanfield", prior_precision=lam, prior_mean=prior_mean, vi_samples=S
    ).fit(x, y)
    h = clf.elbo_history_
    assert clf.vi_converged_ and len(h) > 2
    assert all(b >= a - 1e-9 for a, b in zip(h, h[1:]))  # deterministic objective: monotone
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    mu0 = theta if prior_mean == "theta" else torch.zeros_like(theta)
    xi = antithetic_normals(18, S, k, 0, theta.device)
    m, s = clf._vi.mean, clf._vi.scale
    torch.testing.assert_close(
        torch.as_tensor(clf.elbo_, dtype=DT),
        _dense_elbo(model, x, y, lam, mu0, m, s, xi),
        atol=1e-9,
        rtol=1e-10,
    )
    # stationary (VI stops when the ELBO changes by < 1e-7 relative): the dense ELBO's gradient
    mm, ls = m.clone().requires_grad_(True), torch.log(s).clone().requires_grad_(True)
    g = torch.autograd.grad(_dense_elbo(model, x, y, lam, mu0, mm, torch.exp(ls), xi), (mm, ls))
    assert float(torch.cat(g).norm()) < 5e-3, float(torch.cat(g).norm())


def test_meanfield_predictive_equals_dense_jacobian_computation():
    torch.manual_seed(9)
    model = tanh_mlp(d_in=3, width=5, k=3).to(DT)
    x, y = _data(n=15, seed=10, model=model)
    xs, _ = _data(n=7, seed=11)
    clf = LinearizedClassifier(
        model, inference="vi", vi_family="meanfield", prior_precision=2.0, link_approx="probit"
    )
    clf.fit(x, y)
    mean, cov = clf.predict_f(xs)
    Js = dense_jacobian(model, xs)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    m, s = clf._vi.mean, clf._vi.scale
    torch.testing.assert_close(
        mean, eval_forward(model, xs) + torch.einsum("nkp,p->nk", Js, m - theta), atol=1e-12, rtol=1e-10
    )
    torch.testing.assert_close(
        cov, torch.einsum("nkp,p,nlp->nkl", Js, s.square(), Js), atol=1e-12, rtol=1e-10
    )
    torch.testing.assert_close(clf.weights(), m)
    probit = torch.softmax(mean / torch.sqrt(1 + torch.pi / 8 * cov.diagonal(dim1=1, dim2=2)), -1)
    torch.testing.assert_close(clf.predict_proba(xs), probit, atol=1e-12, rtol=0)


def test_meanfield_chunked_jacobians_equal_the_cached_path():
    """A tiny memory budget forces J to be recomputed chunk by chunk at every ELBO evaluation."""
    torch.manual_seed(12)
    model = tanh_mlp(d_in=3, width=5, k=3).to(DT)
    x, y = _data(n=14, seed=13)
    xs, _ = _data(n=5, seed=14)
    kw = dict(inference="vi", vi_family="meanfield", prior_precision=1.0, vi_max_iter=30, space="weight")
    a = LinearizedClassifier(model, **kw).fit(x, y)
    b = LinearizedClassifier(model, memory_budget=4000, **kw).fit(x, y)
    assert b.lin.memory_budget < 14 * 3 * b.lin.num_params * 8  # J does not fit: chunked
    torch.testing.assert_close(b.elbo_history_, a.elbo_history_, atol=1e-9, rtol=1e-10)
    torch.testing.assert_close(b.predict_proba(xs), a.predict_proba(xs), atol=1e-10, rtol=0)


def test_vi_callback_reports_every_elbo_iteration_and_interrupts_cleanly():
    model = tanh_mlp(d_in=3, width=4, k=3).to(DT)
    x, y = _data(n=12, seed=15)
    for family in ("subspace", "meanfield"):
        seen = []
        clf = LinearizedClassifier(model, inference="vi", vi_family=family, prior_precision=1.0)
        clf.fit(x, y, callback=seen.append)
        vi = [d for d in seen if d["stage"] == "vi"]
        assert [d["step"] for d in vi] == list(range(1, len(vi) + 1))
        assert [d["elbo"] for d in vi] == clf.elbo_history_[1:]

    def stop(info):
        if info["stage"] == "vi":
            raise KeyboardInterrupt

    before = fingerprint(model)
    clf = LinearizedClassifier(model, inference="vi", vi_family="meanfield", prior_precision=1.0)
    with pytest.raises(KeyboardInterrupt):
        clf.fit(x, y, callback=stop)
    with pytest.raises(fntk.classify.NotFittedError):
        clf.predict(x)
    assert_same_fingerprint(before, fingerprint(model))
    with pytest.raises(ValueError, match=r"vi_family must be one of \['subspace', 'meanfield'\]"):
        LinearizedClassifier(model, vi_family="full")


def test_meanfield_and_lbfgs_survive_save_and_load(tmp_path):
    model = tanh_mlp(d_in=3, width=4, k=3).to(DT)
    x, y = _data(n=12, seed=16)
    xs, _ = _data(n=4, seed=17)
    for kw in (dict(inference="vi", vi_family="meanfield"), dict(inference="laplace", solver="lbfgs")):
        clf = LinearizedClassifier(model, prior_precision=1.0, **kw).fit(x, y)
        clf.save(tmp_path / "clf.fntk")
        back = fntk.load(tmp_path / "clf.fntk", model)
        torch.testing.assert_close(back.predict_proba(xs), clf.predict_proba(xs), atol=0, rtol=0)


def test_lbfgs_minimize_reaches_tight_tolerances_on_an_ill_conditioned_quadratic():
    """Ψ(w) = ½ wᵀ A w − bᵀ w + 1e3 (a large constant: Ψ's rounding hides the last decreases),
    cond(A) = 1e4; the minimiser A⁻¹ b from a dense solve."""
    from fntk.linalg import lbfgs as _lbfgs

    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=DT)).Q
    A = Q @ torch.diag(torch.logspace(0, 4, 40, dtype=DT)) @ Q.T
    b = torch.randn(40, generator=g, dtype=DT)
    calls = []

    def fg(w):
        return float(0.5 * w @ A @ w - b @ w + 1e3), A @ w - b

    w, hist, ok = _lbfgs.minimize(
        fg, torch.zeros(40, dtype=DT), 1e-10, 2000, notify=lambda *a: calls.append(a)
    )
    assert ok and hist[-1][1] <= 1e-10 and len(calls) == len(hist)
    torch.testing.assert_close(w, torch.linalg.solve(A, b), atol=1e-10, rtol=0)


def test_one_not_fitted_error_for_both_estimators():
    model = tanh_mlp(d_in=3, width=4, k=1).to(DT)
    x = torch.randn(4, 3, dtype=DT)
    for est in (LinearizedClassifier(model), fntk.NTKRegressor(model)):
        with pytest.raises(fntk.NotFittedError, match="not fitted yet"):
            est.predict(x)


def test_lbfgs_that_runs_out_of_iterations_says_so():
    model = tanh_mlp(d_in=3, width=4, k=3).to(DT)
    x, y = _data(n=12, seed=18)
    clf = LinearizedClassifier(model, inference="map", prior_precision=0.1, solver="lbfgs", max_iter=3)
    with pytest.warns(
        RuntimeWarning,
        match=r"MAP solve stopped after 3 lbfgs iterations with ‖∇Ψ‖ = .*\(max_iter=3 reached\)",
    ):
        clf.fit(x, y)
    assert not clf.converged_ and clf.n_iter_ == 3 and clf.grad_norm_ > 1e-6
    assert len(clf.map_history_) == 4  # the start and three iterates
