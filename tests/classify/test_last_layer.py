"""The exact last-layer backend (classify/last_layer.py) against the general weight-space path and the
dense float64 reference: MAP, Laplace covariances, evidence, its slope, the chosen λ and predictions
agree to 1e-10 in float64 for k ≥ 2 (both factorisations) and k = 1; the structure is detected only
where it holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fntk
import zoo
from fntk import LinearizedClassifier
from fntk.classify import cost
from fntk.classify.evidence import optimize_prior_precision
from fntk.classify.kron import KronFactor, SoftmaxFactor, kron_ggn
from fntk.classify.last_layer import LastLayer
from fntk.classify.objective import Terms
from fntk.classify.weight_space import WeightSpace
from fntk.likelihoods import Bernoulli, Categorical
from fntk.linearize.taps import final_inputs, final_linear

from classify_reference import DenseReference, _data
from models import tanh_mlp
from reference import assert_same_fingerprint, dense_jacobian, fingerprint, rel_err

DT = torch.float64
LAST = ["4.weight", "4.bias"]
TOL = 1e-11  # MAP tolerance of both paths: their optima then agree far below 1e-10


def _rel(a, b) -> float:
    return rel_err(torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT))


def _labels(model, n, k, seed):
    """x and labels that mostly agree with a rotated version of the model (a new task with an
    interior evidence maximum); k = 1: Bernoulli labels from the one logit."""
    if k > 1:
        return _data(n=n, k=k, seed=seed, model=model)
    x, _ = _data(n=n, k=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logit = model(x @ torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DT)).Q)[:, 0]
    return x, torch.bernoulli(torch.sigmoid(4 * logit), generator=g).long()


def _pair(model, x, y, params=LAST, **kw):
    kw.setdefault("tol", TOL)
    a = LinearizedClassifier(model, params, **kw).fit(x, y)
    b = LinearizedClassifier(model, params, space="weight", covariance="dense", **kw).fit(x, y)
    return a, b


def _assert_same(a, b, xs, rtol=1e-10):
    assert a.space_ == "last-layer" and b.space_ == "weight-dense"
    assert _rel(a.prior_precision_, b.prior_precision_) < rtol
    assert _rel(a.weights(), b.weights()) < rtol
    ma, ca = a.predict_f(xs)
    mb, cb = b.predict_f(xs)
    assert _rel(ma, mb) < rtol
    if cb is not None:
        assert _rel(ca, cb) < rtol
    assert _rel(a.log_marginal_likelihood(), b.log_marginal_likelihood()) < rtol
    assert _rel(a.predict_proba(xs), b.predict_proba(xs)) < rtol
    assert len(a.marglik_history_) == len(b.marglik_history_)
    for (la, za, da), (lb, zb, db) in zip(a.marglik_history_, b.marglik_history_):
        # secant steps on slopes near 0 amplify last-bit differences of the iterates (the final
        # λ, above, agrees to rtol)
        assert _rel(la, lb) < 1e-8 and _rel(za, zb) < rtol and abs(da - db) < 1e-8


@pytest.mark.parametrize("k", [3, 1])
@pytest.mark.parametrize("prior_mean", ["theta", "zero"])
@pytest.mark.parametrize("prior", ["marglik", 0.7])
def test_last_layer_equals_general_weight_space(k, prior_mean, prior):
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=6, k=k).to(DT)
    x, y = _labels(model, 40, k, 10)
    xs, _ = _data(n=7, seed=11)
    before = fingerprint(model)
    a, b = _pair(model, x, y, inference="laplace", prior_precision=prior, prior_mean=prior_mean)
    assert_same_fingerprint(before, fingerprint(model))
    assert a.converged_ and b.converged_
    _assert_same(a, b, xs)
    # and against the independent dense reference (plain-autograd Jacobian, its own Newton)
    ref = DenseReference(model, x, y, a.prior_precision_, mu0_zero=prior_mean == "zero", names=LAST)
    mean, cov = ref.predictive(xs)
    got_mean, got_cov = a.predict_f(xs)
    torch.testing.assert_close(got_mean, mean, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(got_cov, cov, atol=1e-9, rtol=1e-9)
    assert a.log_marginal_likelihood() == pytest.approx(ref.log_evidence(), rel=1e-10)


@pytest.mark.parametrize("factor", ["dense", "softmax"])
def test_both_factorisations_equal_weight_space_backend(factor):
    """The backends directly: the evidence search, slopes, γ and the covariances at the training
    points, for the dense Kronecker Cholesky and the softmax capacitance form."""
    torch.manual_seed(1)
    model = tanh_mlp(d_in=3, width=5, k=4).to(DT)
    x, y = _data(n=30, k=4, seed=3, model=model)
    lin = fntk.Linearized(model, LAST)
    x = lin.check_input(x)
    info = final_linear(lin, x)
    assert info is not None and (info.module, info.d_in, info.k) == ("4", 5, 4)
    ll = LastLayer(lin, x, y, Categorical(), None, info, factor)
    ws = WeightSpace(lin, x, y, Categorical(), None, dense=True)
    la, _, ha = optimize_prior_precision(ll, TOL, 100)
    lb, _, hb = optimize_prior_precision(ws, TOL, 100)
    assert _rel(la, lb) < 1e-10 and len(ha.history) == len(hb.history)
    for (l1, z1, d1), (l2, z2, d2) in zip(ha.history, hb.history):
        assert _rel(l1, l2) < 1e-10 and _rel(z1, z2) < 1e-12 and abs(d1 - d2) < 1e-9
    assert _rel(ll.effective_params(), ws.effective_params()) < 1e-10
    ta, tb = ll.slope_terms(), ws.slope_terms()  # D ≈ 0 at the optimum: compare its pieces
    for a, b in zip((ta.gamma, ta.lam_sq, ta.lam_t), (tb.gamma, tb.lam_sq, tb.lam_t)):
        assert _rel(a, b) < 1e-8
    assert abs(ta.slope - tb.slope) < 1e-9
    assert _rel(ll.weights(), ws.weights()) < 1e-10
    ma, ca = ll.predict(x)
    mb, cb = ws.predict(x)
    assert _rel(ma, mb) < 1e-10 and _rel(ca, cb) < 1e-10


@pytest.mark.parametrize("n", [30, 11])
def test_first_map_preconditioned_by_half_the_points(monkeypatch, n):
    """The first Newton system is preconditioned by the softmax factorisation of every other point
    (n ≥ 2 d̃ = 12), the posterior factorised on all of them; the MAP and Laplace factors are the
    weight-space backend's (1e-10) either way."""
    torch.manual_seed(1)
    model = tanh_mlp(d_in=3, width=5, k=4).to(DT)
    x, y = _data(n=n, k=4, seed=3, model=model)
    lin = fntk.Linearized(model, LAST)
    x = lin.check_input(x)
    rows = []
    init = SoftmaxFactor.__init__

    def record(self, Phi, pi, lam):
        rows.append(Phi.shape[0])
        init(self, Phi, pi, lam)

    monkeypatch.setattr(SoftmaxFactor, "__init__", record)
    ll = LastLayer(lin, x, y, Categorical(), None, final_linear(lin, x), "softmax")
    assert ll.fit(0.5, TOL, 100).converged
    assert rows[0] == ((n + 1) // 2 if n >= 12 else n) and rows[-1] == n
    ws = WeightSpace(lin, x, y, Categorical(), None, dense=True)
    ws.fit(0.5, TOL, 100)
    assert _rel(ll.weights(), ws.weights()) < 1e-10
    assert _rel(ll.log_evidence(), ws.log_evidence()) < 1e-12
    assert _rel(ll.predict(x)[1], ws.predict(x)[1]) < 1e-10


def test_newton_direction_survives_a_broken_preconditioner():
    """A preconditioner whose float32 copies overflowed (inf) cannot mislead a Newton step: CG's
    float64 residual rejects it and the direction comes from a fresh exact factorisation."""
    torch.manual_seed(1)
    model = tanh_mlp(d_in=3, width=5, k=4).to(DT)
    x, y = _data(n=30, k=4, seed=3, model=model)
    lin = fntk.Linearized(model, LAST)
    x = lin.check_input(x)
    ll = LastLayer(lin, x, y, Categorical(), None, final_linear(lin, x), "softmax")
    ll.fit(0.5, TOL, 100)
    ll.Wm = ll.Wm + 0.1  # away from the MAP
    terms = Terms(Categorical(), ll._logits(ll.Wm), y)
    G = terms.g.T @ ll.Phi + 0.5 * (ll.Wm - ll.M0)
    want = SoftmaxFactor(ll.Phi, torch.softmax(terms.f, -1), 0.5).solve(G[None])[0]
    ll.factor.precondition(G[None])  # forms the float32 copies, then break them
    ll.factor.pre32 = tuple(torch.full_like(t, float("inf")) for t in ll.factor.pre32)
    before = ll.factorizations
    got = ll._direction(terms, G, float(G.norm()), 0.5)
    assert ll.factorizations == before + 1 and _rel(got, want) < 1e-12


#: zoo families whose last nn.Linear is the model's output: the last-layer backend takes them
ZOO_LAST = ["resnet_bn", "hardswish_se", "prelu_mlp", "prelu_cnn", "lstm", "gru_text", "transformer_text",
            "embedding_pad", "mha_kdim", "embedding_bag", "masked_linear", "checkpoint", "dict_out",
            "model_output"]


def _last_linear(model: nn.Module) -> list[str]:
    name, m = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return [f"{name}.weight"] + ([f"{name}.bias"] if m.bias is not None else [])


@pytest.mark.parametrize("name", ZOO_LAST)
def test_last_layer_on_the_model_families(name):
    """The families users bring (residual/BN and SE CNNs, PReLU, RNNs, transformers with Embedding
    and padding masks, attention, custom Linear subclasses, checkpointing, dict outputs), their last
    layer on 30 points (first MAP preconditioned by half of them where d + 1 ≤ 15): the evidence
    search, MAP and Laplace predictive equal the general weight-space path (1e-10) and the dense
    float64 reference at the chosen λ."""
    case = zoo.build(name)
    x = torch.cat([zoo.build(name, seed=s).x for s in range(6)])
    params = _last_linear(case.model)
    before = fingerprint(case.model)
    lin = fntk.Linearized(case.model, params, output_fn=case.output_fn)
    x = lin.check_input(x)
    phi, f = final_inputs(lin, final_linear(lin, x), x)
    # a new task the last layer can learn, with label noise (so the evidence has an interior
    # maximum): labels drawn from the softmax of another linear readout of the same features
    g = torch.Generator().manual_seed(1)
    logits = phi @ torch.randn(phi.shape[1], f.shape[1], generator=g, dtype=DT)
    logits = 2 * logits / logits.std()
    y = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    a, b = _pair(case.model, x, y, params, inference="laplace", prior_precision="marglik",
                 output_fn=case.output_fn)
    _assert_same(a, b, case.xs)
    names = ["m." + p for p in params]
    ref = DenseReference(zoo.reference_model(case), x, y, a.prior_precision_, names=names)
    mean, cov = ref.predictive(case.xs)
    got_mean, got_cov = a.predict_f(case.xs)
    assert _rel(got_mean, mean) < 1e-9 and _rel(got_cov, cov) < 1e-9
    assert a.log_marginal_likelihood() == pytest.approx(ref.log_evidence(), rel=1e-10)
    assert_same_fingerprint(before, fingerprint(case.model))


def test_last_layer_on_dict_inputs():
    """A Hugging Face-style text classifier (dict batch of int64 ids and padding masks, a
    ModelOutput with logits): the last-layer backend equals the general weight-space path."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = zoo.DictTextClassifier(zoo.TextConfig()).to(DT).eval()
    x, xs = zoo.text_batch(g, 30), zoo.text_batch(g, 5)
    y = torch.arange(30) % 3
    a, b = _pair(model, x, y, ["classifier.weight", "classifier.bias"], inference="laplace",
                 prior_precision="marglik")
    _assert_same(a, b, xs)


def test_factors_are_the_precision():
    """log det, solves, preconditioner and S blocks of both factorisations against the explicit P."""
    g = torch.Generator().manual_seed(0)
    n, d, k, lam = 13, 5, 3, 0.3
    Phi = torch.randn(n, d, generator=g, dtype=DT)
    pi = torch.softmax(torch.randn(n, k, generator=g, dtype=DT), -1)
    H = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
    J = torch.stack([torch.kron(torch.eye(k, dtype=DT), Phi[i][None]) for i in range(n)])  # (n, k, kd)
    P = torch.einsum("nkp,nkl,nlq->pq", J, H, J) + lam * torch.eye(k * d, dtype=DT)
    torch.testing.assert_close(kron_ggn(Phi, H), P - lam * torch.eye(k * d, dtype=DT), rtol=1e-13, atol=1e-14)
    B = torch.randn(2, k, d, generator=g, dtype=DT)
    Phi_x = torch.randn(4, d, generator=g, dtype=DT)
    Jx = torch.stack([torch.kron(torch.eye(k, dtype=DT), Phi_x[i][None]) for i in range(4)])
    Pinv = torch.linalg.inv(P)
    for F in (KronFactor(Phi, H, lam), SoftmaxFactor(Phi, pi, lam)):
        assert F.logdet() == pytest.approx(float(torch.logdet(P)), rel=1e-13)
        want = (Pinv @ B.reshape(2, -1).T).T.reshape(2, k, d)
        torch.testing.assert_close(F.solve(B), want, rtol=1e-11, atol=1e-12)
        # the softmax form preconditions in float32 (CG's residuals stay float64)
        pre_tol = 1e-5 if isinstance(F, SoftmaxFactor) else 1e-9
        torch.testing.assert_close(F.precondition(B), want, rtol=pre_tol, atol=pre_tol)
        assert F.precondition(B).dtype == DT
        torch.testing.assert_close(F.blocks(Phi_x), Jx @ Pinv @ Jx.mT, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(F.blocks(None), J @ Pinv @ J.mT, rtol=1e-11, atol=1e-12)


def test_weight_only_and_float32():
    torch.manual_seed(2)
    model = tanh_mlp(d_in=3, width=6, k=3).to(DT)
    x, y = _data(n=25, seed=4, model=model)
    xs, _ = _data(n=6, seed=5)
    a, b = _pair(model, x, y, params=["4.weight"], prior_precision="marglik")
    assert a._backend.d == 6  # no bias column: the bias stays at its value
    _assert_same(a, b, xs)
    m32 = tanh_mlp(d_in=3, width=6, k=3)
    m32.load_state_dict({kk: v.float() for kk, v in model.state_dict().items()})
    a32, b32 = _pair(m32, x.float(), y, prior_precision="marglik", tol=1e-8)
    assert a32.space_ == "last-layer" and a32.predict_proba(xs.float()).dtype == torch.float32
    assert _rel(a32.prior_precision_, b32.prior_precision_) < 1e-6  # float32 features, float64 algebra
    assert _rel(a32.predict_proba(xs.float()), b32.predict_proba(xs.float())) < 1e-6


def test_whole_linear_model_is_logistic_regression():
    """A model that is one nn.Linear: φ = x, the Laplace is Bayesian logistic regression."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    x, y = _data(n=30, d=4, seed=3)
    xs, _ = _data(n=7, d=4, seed=4)
    clf = LinearizedClassifier(model, prior_precision=0.5, tol=TOL).fit(x, y)
    assert clf.space_ == "last-layer"
    ref = DenseReference(model, x, y, 0.5)
    torch.testing.assert_close(clf.weights(), ref.w, atol=1e-10, rtol=1e-10)
    mean, cov = clf.predict_f(xs)
    rmean, rcov = ref.predictive(xs)
    torch.testing.assert_close(mean, rmean, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cov, rcov, atol=1e-10, rtol=1e-10)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        return 2 * self.fc(torch.tanh(self.body(x)))  # the layer's output is not f(x)


class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x) @ self.fc.weight)  # the final weight also feeds φ
        return self.fc(h)


class _MyLinear(nn.Linear):
    pass


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):  # (n, 4, 3) → (n, 8): the layer is shared over 4 positions
        return self.fc(x).flatten(1)


CASES = ["all", "scaled", "reused", "subclass", "sequence", "output_fn", "bias_only"]


@pytest.mark.parametrize("case", CASES)
def test_structure_detected_only_where_it_holds(case):
    torch.manual_seed(0)
    x, y = _data(n=20, seed=6)
    kw: dict = {}
    if case in ("all", "output_fn", "bias_only"):
        model, params = tanh_mlp(d_in=3, width=5, k=3), ["4.weight", "4.bias"]
        params = None if case == "all" else ["4.bias"] if case == "bias_only" else params
        if case == "output_fn":
            kw["output_fn"] = lambda out: out[:, :2]
            y = y % 2
    elif case == "scaled":
        model, params = _Scaled(), ["fc.weight", "fc.bias"]
    elif case == "reused":
        model, params = _Reused(), ["fc.weight", "fc.bias"]
    elif case == "subclass":
        model, params = tanh_mlp(d_in=3, width=5, k=3), ["4.weight", "4.bias"]
        model[4] = _MyLinear(5, 3)
    else:
        model, params = _Seq(), ["fc.weight", "fc.bias"]
        x = torch.randn(20, 4, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
        y = y % 8
    model = model.to(DT)
    clf = LinearizedClassifier(model, params, prior_precision=0.9, tol=TOL, **kw).fit(x, y)
    assert clf.space_ != "last-layer"
    assert final_linear(clf.lin, clf.lin.check_input(x)) is None
    if case in ("scaled", "reused"):  # the general path is right there: the dense reference
        ref = DenseReference(model, x, y, 0.9, names=params)
        torch.testing.assert_close(clf.weights(), ref.w, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(dense_jacobian(model, x, params), ref.J)


def test_plan_prices_both_forms():
    lin = fntk.Linearized(tanh_mlp(d_in=3, width=40, k=10).to(DT), ["4.weight", "4.bias"])
    few, many = torch.randn(30, 3, dtype=DT), torch.randn(3000, 3, dtype=DT)
    lin.check_input(few)
    plans = [cost.last_layer_plan(lin, x, Categorical(), "auto", "newton", "auto", True) for x in (few, many)]
    assert [p.factor for p in plans] == ["softmax", "dense"]  # the n × n core pays for n ≲ a few d̃
    assert cost.last_layer_plan(lin, few, Bernoulli(), "auto", "newton", "auto", True).factor == "dense"
    off = (("weight", "newton", "auto"), ("auto", "lbfgs", "auto"), ("auto", "newton", "lowrank"))
    for space, solver, cov in off:
        assert cost.last_layer_plan(lin, few, Categorical(), space, solver, cov, True) is None


def test_vi_map_and_save_load(tmp_path):
    torch.manual_seed(3)
    model = tanh_mlp(d_in=3, width=4, k=3).to(DT)
    x, y = _data(n=12, seed=14, model=model)
    xs, _ = _data(n=5, seed=15)
    kw = dict(inference="vi", prior_precision=2.0, vi_samples=64, link_approx="probit", vi_rank=100)
    a = LinearizedClassifier(model, LAST, **kw).fit(x, y)
    b = LinearizedClassifier(model, LAST, space="weight", **kw).fit(x, y)
    assert a.space_ == "last-layer" and a.vi_rank_ == b.vi_rank_ == 15  # the subspace is complete
    torch.testing.assert_close(a.predict_proba(xs), b.predict_proba(xs), atol=0.02, rtol=0)
    m = LinearizedClassifier(model, LAST, inference="map", prior_precision="marglik").fit(x, y)
    m.save(tmp_path / "ll.fntk")
    back = fntk.load(tmp_path / "ll.fntk", model)
    assert back.space_ == "last-layer" and torch.equal(back.predict_proba(xs), m.predict_proba(xs))
    assert torch.equal(back.weights(), m.weights())


def test_evidence_search_model_step_finds_the_zero_of_power_law_pieces():
    """When γ, λ‖w* − μ₀‖² and λT are powers of λ (and when one piece is 0, as λT for a Gaussian
    likelihood), the model step through two evaluations lands on the zero of the slope itself."""
    import math

    from fntk.classify.evidence import model_step
    from fntk.classify.objective import SlopeTerms

    def terms(rho, t_scale):
        lam = math.exp(rho)
        return rho, SlopeTerms(40.0 * lam**-0.35, 3.0 * lam**0.2, t_scale * lam**-0.6)

    for t_scale in (5.0, 0.0):
        lo, hi = -5.0, 10.0  # the true zero by bisection on D itself
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if terms(mid, t_scale)[1].slope > 0 else (lo, mid)
        for r0, r1 in ((6.0, 5.0), (-1.0, 0.5)):  # from above and from below the maximum
            root = model_step(terms(r0, t_scale), terms(r1, t_scale), max_step=8.0)
            assert root is not None and abs(root - lo) < 1e-9
        assert model_step(terms(6.0, t_scale), terms(5.0, t_scale), max_step=0.1) is None  # too far
