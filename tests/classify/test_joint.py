"""LinearizedClassifier.predict_f_joint and .sample: the joint Gaussian of the logits at a set of test
points, for every backend (function space, dense and low-rank weight space, the last-layer backend
with both factorisations) and every posterior (Laplace, subspace and mean-field VI).

References: the dense float64 J(x) Σ J(x)ᵀ with J from tests/reference.py (plain autograd) and Σ the
reference's own inverse precision (Laplace) or the fitted q(w) written out as a p × p matrix (VI);
the diagonal blocks against predict_f (1e-10); the sampling transform checked exactly by
regenerating its base normal draws; sample moments against the analytic ones.
"""

from __future__ import annotations

import pytest
import torch

import fntk
from fntk import LinearizedClassifier
from fntk.classify.evidence import optimize_prior_precision
from fntk.classify.last_layer import LastLayer
from fntk.classify.predictive import sample_logits
from fntk.likelihoods import Categorical
from fntk.linalg import psd_root
from fntk.linearize.taps import final_linear

from classify_reference import DenseReference, _data
from models import tanh_mlp
from reference import assert_same_fingerprint, dense_jacobian, eval_forward, fingerprint, rel_err

DT = torch.float64
LAST = ["4.weight", "4.bias"]
BACKENDS = [  # (space, covariance, params): the backend LinearizedClassifier takes
    ("function", "auto", None),
    ("weight", "dense", None),
    ("weight", "lowrank", None),
    ("auto", "auto", LAST),  # the exact last-layer backend
]


def _fit(model, x, y, space, cov, params, **kw):
    kw.setdefault("tol", 1e-12)
    kw.setdefault("prior_precision", 1.3)
    return LinearizedClassifier(model, params, space=space, covariance=cov, rank=10_000, **kw).fit(x, y)


def _problem(k, n=15, m=6, seed=3):
    torch.manual_seed(seed)
    model = tanh_mlp(d_in=3, width=5, k=k).to(DT)
    x, y = _data(n=n, k=k, seed=6)
    xs, _ = _data(n=m, seed=7)
    return model, x, y, xs


def _diag_blocks(C, m, k):
    C4 = C.reshape(m, k, m, k)
    i = torch.arange(m)
    return C4[i, :, i, :]


def _check_blocks(clf, xs):
    """The joint covariance's (k × k) diagonal blocks and its mean equal predict_f's (1e-10)."""
    mean, cov = clf.predict_f_joint(xs)
    m, k = mean.shape
    assert cov.shape == (m * k, m * k) and torch.equal(cov, cov.T)
    pm, pc = clf.predict_f(xs)
    assert rel_err(mean, pm) < 1e-10
    assert rel_err(_diag_blocks(cov, m, k), pc) < 1e-10
    return mean, cov


def _pushforward(model, xs, names, w, Sigma, theta):
    """Dense float64 reference: f(x; θ̂) + J(x)(w − θ̂) (m, k) and J Σ Jᵀ (m·k × m·k)."""
    Js = dense_jacobian(model, xs, names)
    m, k, p = Js.shape
    Jf = Js.reshape(m * k, p)
    return eval_forward(model, xs) + (Jf @ (w - theta)).reshape(m, k), Jf @ Sigma @ Jf.T


# ------------------------------------------------------------------------------------------ Laplace
@pytest.mark.parametrize("space,cov,params", BACKENDS)
@pytest.mark.parametrize("k", [3, 1])
def test_laplace_joint_covariance_equals_dense_reference(space, cov, params, k):
    model, x, y, xs = _problem(k)
    clf = _fit(model, x, y, space, cov, params)
    expected_space = {"function": "function", "dense": "weight-dense", "lowrank": "weight-lowrank"}
    assert clf.space_ == ("last-layer" if params else expected_space[cov if space == "weight" else space])
    mean, C = _check_blocks(clf, xs)
    ref = DenseReference(model, x, y, 1.3, names=params)
    ref_mean, ref_cov = _pushforward(model, xs, params, ref.w, ref.cov, ref.theta)
    assert rel_err(mean, ref_mean) < 1e-9
    assert rel_err(C, ref_cov) < 1e-9


@pytest.mark.parametrize("factor", ["dense", "softmax"])
def test_last_layer_joint_covariance_both_factorisations(factor):
    torch.manual_seed(1)
    model = tanh_mlp(d_in=3, width=5, k=4).to(DT)
    x, y = _data(n=30, k=4, seed=3, model=model)
    xs, _ = _data(n=9, seed=8)  # m·k = 36 > p = 24: a singular joint covariance
    lin = fntk.Linearized(model, LAST)
    x, xs = lin.check_input(x), lin.check_input(xs)
    ll = LastLayer(lin, x, y, Categorical(), None, final_linear(lin, x), factor)
    lam, _, _ = optimize_prior_precision(ll, 1e-12, 100)
    mean, C = ll.predict_joint(xs)
    pm, pc = ll.predict(xs)
    assert rel_err(mean, pm) < 1e-10 and rel_err(_diag_blocks(C, 9, 4), pc) < 1e-10
    ref = DenseReference(model, x, y, lam, names=LAST)
    ref_mean, ref_cov = _pushforward(model, xs, LAST, ref.w, ref.cov, ref.theta)
    assert rel_err(mean, ref_mean) < 1e-9 and rel_err(C, ref_cov) < 1e-9
    assert int(torch.linalg.matrix_rank(C)) == 24  # rank p: more logits than weights


# ------------------------------------------------------------------------------------------ VI
def _subspace_basis(clf, model, x, names):
    """The fitted subspace U (p, r) of subspace VI, written out from the backend's pieces."""
    b = clf._backend
    if b.space == "function":  # U = J(X)ᵀ Q_r diag(e_r^-½)
        e, Q = b._sub
        J = dense_jacobian(model, x, names)
        return J.reshape(-1, J.shape[2]).T @ Q / e.sqrt()
    if b.space == "last-layer":  # U columns e_c ⊗ v_j, flattened in the Linearized order
        V, cc = b._sub
        M = torch.zeros(V.shape[0], b.k, b.d, dtype=DT)
        M[torch.arange(V.shape[0]), cc] = V
        return b._flat(M).T
    return b._U


@pytest.mark.parametrize("space,cov,params", [BACKENDS[0], BACKENDS[1], BACKENDS[3]])
def test_subspace_vi_joint_covariance_equals_dense_reference(space, cov, params):
    model, x, y, xs = _problem(3, n=10, m=5)
    clf = _fit(model, x, y, space, cov, params, inference="vi", vi_rank=8, vi_samples=16, vi_max_iter=50)
    mean, C = _check_blocks(clf, xs)
    lam = clf.prior_precision_
    U = _subspace_basis(clf, model, x, params)
    p = U.shape[0]
    assert rel_err(U.T @ U, torch.eye(U.shape[1], dtype=DT)) < 1e-9 and U.shape[1] == clf.vi_rank_ == 8
    mu, S = clf._vi.mean, clf._vi.scale
    Sigma = U @ S @ S.T @ U.T + (torch.eye(p, dtype=DT) - U @ U.T) / lam  # q(u) on U, the prior elsewhere
    theta = clf.lin.theta.to(DT)
    ref_mean, ref_cov = _pushforward(model, xs, params, theta + U @ mu, Sigma, theta)
    assert rel_err(mean, ref_mean) < 1e-9 and rel_err(C, ref_cov) < 1e-9


def test_meanfield_vi_joint_covariance_equals_dense_reference():
    model, x, y, xs = _problem(3, n=10, m=5)
    clf = _fit(model, x, y, "auto", "auto", None, inference="vi", vi_family="meanfield", vi_samples=16,
               vi_max_iter=30)
    mean, C = _check_blocks(clf, xs)
    theta = clf.lin.theta.to(DT)
    ref_mean, ref_cov = _pushforward(model, xs, None, clf._vi.mean, torch.diag(clf._vi.scale**2), theta)
    assert rel_err(mean, ref_mean) < 1e-10 and rel_err(C, ref_cov) < 1e-10


# ------------------------------------------------------------------------------------------ samples
def _base_draws(mk, s, seed):
    return torch.randn(mk, s, dtype=DT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", ["function", "last-layer", "meanfield", "binary"])
def test_sampling_transform_is_exact(case):
    """f_s − μ = A ε_s with the base draws ε regenerated from the seed: A = (F − μ) ε⁺ recovered by
    least squares (exact: ε has full row rank), and A Aᵀ is the dense reference covariance."""
    k = 1 if case == "binary" else 3
    model, x, y, xs = _problem(k, n=12, m=4)
    if case == "meanfield":
        clf = _fit(model, x, y, "auto", "auto", None, inference="vi", vi_family="meanfield",
                   vi_samples=8, vi_max_iter=20)
        ref_cov = _pushforward(model, xs, None, clf._vi.mean, torch.diag(clf._vi.scale**2),
                               clf.lin.theta.to(DT))[1]
    else:
        params = LAST if case == "last-layer" else None
        clf = _fit(model, x, y, "function" if case != "last-layer" else "auto", "auto", params)
        ref = DenseReference(model, x, y, 1.3, names=params)
        ref_cov = _pushforward(model, xs, params, ref.w, ref.cov, ref.theta)[1]
    mean, _ = clf.predict_f_joint(xs)
    m, mk, s = 4, 4 * k, 4 * k + 7
    F = clf.sample(xs, s, generator=torch.Generator().manual_seed(11))
    assert F.shape == (s, m, k) and F.dtype == DT
    eps = _base_draws(mk, s, 11)
    T = (F.reshape(s, mk) - mean.reshape(1, mk)).T  # (m·k, s) = A ε
    A = T @ torch.linalg.pinv(eps)
    assert rel_err(A @ eps, T) < 1e-12  # the draws are one linear map of exactly these ε
    assert rel_err(A @ A.T, ref_cov) < 1e-9


def test_sample_logits_is_the_root_times_the_draws():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 4, dtype=DT, generator=g)
    cov, mean = B @ B.T, torch.randn(3, 2, dtype=DT, generator=g)  # rank 4 < 6: singular
    A = psd_root(cov)
    assert rel_err(A @ A.T, cov) < 1e-13
    F = sample_logits(mean, cov, 5, torch.Generator().manual_seed(4))
    expected = (mean.reshape(-1, 1) + A @ _base_draws(6, 5, 4)).T.reshape(5, 3, 2)
    assert torch.equal(F, expected)


def test_sample_moments_match_the_analytic_ones():
    model, x, y, xs = _problem(3, n=12, m=2)
    clf = _fit(model, x, y, "function", "auto", None)
    mean, cov = clf.predict_f_joint(xs)
    s = 40_000
    F = clf.sample(xs, s, generator=torch.Generator().manual_seed(2)).reshape(s, -1)
    sd = cov.diagonal().sqrt()
    assert float(((F.mean(0) - mean.reshape(-1)) / sd).abs().max()) < 4.5 / s**0.5
    emp = torch.cov(F.T)
    assert float(((emp - cov) / (sd[:, None] * sd[None, :])).abs().max()) < 0.03


def test_seeding_follows_the_regressor():
    model, x, y, xs = _problem(3, n=10, m=3)
    clf = _fit(model, x, y, "function", "auto", None)
    a = clf.sample(xs, 4, generator=torch.Generator().manual_seed(1))
    b = clf.sample(xs, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, clf.sample(xs, 4, torch.Generator().manual_seed(2)))
    torch.manual_seed(5)
    c = clf.sample(xs, 4)  # generator=None: torch's default generator, as NTKPosterior.sample
    torch.manual_seed(5)
    assert torch.equal(c, clf.sample(xs, 4))
    assert clf.sample(xs).shape == (1, 3, 3)


# ------------------------------------------------------------------------------------------ MAP, errors
def test_map_has_no_posterior_to_sample():
    model, x, y, xs = _problem(3, n=10, m=3)
    clf = _fit(model, x, y, "function", "auto", None, inference="map")
    mean, cov = clf.predict_f_joint(xs)
    assert cov is None and torch.equal(mean, clf.predict_f(xs)[0])
    with pytest.raises(ValueError, match="inference='map' is a point estimate"):
        clf.sample(xs, 3)


def test_bad_arguments_and_memory_guard():
    model, x, y, xs = _problem(3, n=10, m=3)
    clf = _fit(model, x, y, "function", "auto", None)
    with pytest.raises(ValueError, match="num_samples"):
        clf.sample(xs, 0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        clf.sample(xs, 2, generator=3)
    with pytest.raises(fntk.NotFittedError):
        LinearizedClassifier(model).sample(xs, 2)
    small = LinearizedClassifier(model, memory_budget=2**18, prior_precision=1.3).fit(x, y)
    small.predict_f_joint(torch.randn(20, 3, dtype=DT))  # 256 KiB: 20 points fit, 300 do not
    with pytest.raises(fntk.NTKMemoryError, match="joint predictive covariance of m=300"):
        small.predict_f_joint(torch.randn(300, 3, dtype=DT))


# ------------------------------------------------------------------------------------------ save/load
@pytest.mark.parametrize("kw", [
    {"space": "function"},
    {"space": "weight", "covariance": "lowrank"},
    {"params": LAST},
    {"inference": "vi", "vi_rank": 6, "vi_samples": 8, "vi_max_iter": 20},
    {"inference": "vi", "vi_family": "meanfield", "vi_samples": 8, "vi_max_iter": 20},
], ids=["function", "lowrank", "last-layer", "vi", "meanfield"])
def test_save_load_keeps_joint_predictions_and_samples(kw, tmp_path):
    model, x, y, xs = _problem(3, n=10, m=3)
    kw = {"prior_precision": 1.3, "rank": 10_000, **kw}
    clf = LinearizedClassifier(model, kw.pop("params", None), **kw).fit(x, y)
    clf.save(tmp_path / "a.fntk")
    back = fntk.load(tmp_path / "a.fntk", model)
    for got, want in zip(back.predict_f_joint(xs), clf.predict_f_joint(xs)):
        assert torch.equal(got, want)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(back.sample(xs, 5, g1), clf.sample(xs, 5, g2))


# ------------------------------------------------------------------------------------------ model, dtype
@pytest.mark.parametrize("inference", ["laplace", "vi"])
def test_model_is_never_modified_and_float32_results(inference):
    model, x, y, xs = _problem(3, n=10, m=3)
    model32 = tanh_mlp(d_in=3, width=5, k=3)
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    kw = {"inference": inference, "prior_precision": 1.3, "vi_samples": 8, "vi_max_iter": 20}
    clf32 = LinearizedClassifier(model32, **kw).fit(x.float(), y)
    clf64 = LinearizedClassifier(model, **kw).fit(x, y)
    before = fingerprint(model32)
    mean, cov = clf32.predict_f_joint(xs.float())
    F = clf32.sample(xs.float(), 4, torch.Generator().manual_seed(0))
    assert_same_fingerprint(before, fingerprint(model32))
    assert mean.dtype == cov.dtype == F.dtype == torch.float32 and F.shape == (4, 3, 3)
    m64, c64 = clf64.predict_f_joint(xs)
    assert rel_err(mean.double(), m64) < 1e-4 and rel_err(cov.double(), c64) < 1e-3
