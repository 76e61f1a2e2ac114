"""The NTK-GP model options (prior means, input kernels, per-layer scales, source noise) and the
leave-one-out criterion, against dense float64 references written with plain torch: explicit
Jacobians, explicit kernel matrices, GLS by normal equations, leave-one-out by n explicit refits."""

import math

import pytest
import torch
import torch.nn.functional as F

import fntk
from fntk.gp import NTKRegressor, kernels
from fntk.gp.models import GPModel, default_candidates

from models import tanh_mlp
from reference import dense_jacobian, rel_err

F64 = torch.float64
LOG2PI = math.log(2 * math.pi)


pytestmark = pytest.mark.usefixtures("one_thread")


def problem(n=30, k=2, seed=0, width=8):
    torch.manual_seed(seed)
    model = tanh_mlp(d_in=2, width=width, k=k).to(F64)
    x = torch.rand(n, 2, dtype=F64) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(n, dtype=F64)
    xs = torch.rand(7, 2, dtype=F64) * 4 - 2
    return model, x, y, xs


def input_kernel(kind, a, b, ls):
    """RBF / Matérn on explicit pairwise differences (no expansion of ‖a − b‖²)."""
    r = (((a[:, None, :] - b[None, :, :]) / torch.as_tensor(ls, dtype=F64)) ** 2).sum(-1).sqrt()
    if kind == "rbf":
        return torch.exp(-0.5 * r**2)
    if kind == "matern52":
        return (1 + math.sqrt(5) * r + 5 * r**2 / 3) * torch.exp(-math.sqrt(5) * r)
    return (1 + math.sqrt(3) * r) * torch.exp(-math.sqrt(3) * r)


def reference_parts(reg, model, x, xs, output=0, var_out=1):
    """The fitted model's kernel and noise in the data's units, rebuilt from reg.hyperparameters_."""
    hp, m = reg.hyperparameters_, GPModel.parse(reg.model_)
    with torch.no_grad():
        out, outs = model(x), model(xs)
    names = [n for n, _ in model.named_parameters()]

    def ntk(a, b):
        if m.layer_scales:
            groups = [names[i:i + 2] for i in range(0, len(names), 2)]  # (weight, bias) per Linear
            return sum(s * dense_jacobian(model, a, g)[:, output] @ dense_jacobian(model, b, g)[:, output].T
                       for s, g in zip(hp["layer_scales"], groups))
        return hp["scale"] * dense_jacobian(model, a)[:, output] @ dense_jacobian(model, b)[:, output].T

    def kern(a, b, oa, ob):
        K = ntk(a, b)
        if m.input_kernel:
            Kin = hp["input_scale"] * input_kernel(m.input_kernel, a, b, hp["lengthscales"])
            if m.source_amplitude:
                ra, rb = F.softplus(oa[:, var_out]).sqrt(), F.softplus(ob[:, var_out]).sqrt()
                Kin = Kin * ra[:, None] * rb[None]
            K = K + Kin
        return K

    def noise(o):
        d = torch.full((o.shape[0],), hp["noise"], dtype=F64)
        return d + hp["noise_multiplier"] * F.softplus(o[:, var_out]) if m.source_noise else d

    def offset(o):
        return o[:, output] if m.mean in ("network", "scaled") else torch.zeros(o.shape[0], dtype=F64)

    return kern, noise, offset, out, outs, m


def reference_posterior(reg, model, x, y, xs):
    """(mean, latent cov, predictive variance, lml, GLS (a, b)) of the reference GP."""
    kern, noise, offset, out, outs, m = reference_parts(reg, model, x, xs)
    M = kern(x, x, out, out) + torch.diag(noise(out))
    f, fs = out[:, 0], outs[:, 0]
    # GLS in the data's units: y − o = H β + g + ε with H = [1] or [1, f]
    def design(g):
        return g.new_ones(g.shape[0], 1) if m.mean != "scaled" else torch.stack([torch.ones_like(g), g], 1)

    H, Hs = design(f), design(fs)
    r0 = y - offset(out)
    Minv = torch.linalg.inv(M)
    beta = torch.linalg.solve(H.T @ Minv @ H, H.T @ Minv @ r0)
    r = r0 - H @ beta
    alpha = Minv @ r
    Kx = kern(x, xs, out, outs)
    mean = offset(outs) + Hs @ beta + Kx.T @ alpha
    cov = kern(xs, xs, outs, outs) - Kx.T @ Minv @ Kx
    lml = -0.5 * (r @ alpha + torch.logdet(M) + x.shape[0] * LOG2PI)
    a = 1 + float(beta[1]) if m.mean == "scaled" else float(m.mean == "network")
    return mean, cov, cov.diagonal() + noise(outs), float(lml), (a, float(beta[0])), M, H, r0


MODELS = ["scaled", "scaled+rbf", "constant+matern52", "network+matern32", "scaled+rbf+layers",
          "network+hetero", "scaled+rbf@src+hetero"]


@pytest.mark.parametrize("name", MODELS)
def test_composite_model_matches_dense_reference(name):
    """Posterior, log marginal likelihood and GLS coefficients of every kind of model against the
    reference GP at the learned hyperparameters; the learned point is a maximum of the evidence."""
    model, x, y, xs = problem()
    reg = NTKRegressor(model, gp_model=name, variance_output=1).fit(x, y)
    assert reg.model_ == name
    post = reg.predict(xs)
    mean, cov, pvar, lml, (a, b), *_ = reference_posterior(reg, model, x, y, xs)
    assert rel_err(post.mean, mean) <= 1e-8
    assert rel_err(post.covariance_matrix, cov) <= 1e-7
    assert rel_err(post.variance, cov.diagonal()) <= 1e-7
    assert rel_err(post.predictive_variance, pvar) <= 1e-8
    assert reg.log_marginal_likelihood() == pytest.approx(lml, rel=1e-9, abs=1e-9)
    assert (reg.slope_, reg.constant_) == pytest.approx((a, b), rel=1e-8, abs=1e-10)
    hp = reg.hyperparameters_
    assert hp["slope"] == pytest.approx(a, rel=1e-8, abs=1e-10)
    # no hyperprior for a single model: the learned noise maximises the exact (profiled) evidence
    kern, noise, offset, out, _, m = reference_parts(reg, model, x, xs)
    f = out[:, 0]
    H = torch.ones_like(f)[:, None] if m.mean != "scaled" else torch.stack([torch.ones_like(f), f], 1)
    r0 = y - offset(out)
    for step in (0.02, -0.02):
        M = kern(x, x, out, out) + torch.diag(noise(out) + step * hp["noise"])
        Minv = torch.linalg.inv(M)
        r = r0 - H @ torch.linalg.solve(H.T @ Minv @ H, H.T @ Minv @ r0)
        other = -0.5 * (r @ Minv @ r + torch.logdet(M) + x.shape[0] * LOG2PI)
        assert float(other) < lml + 1e-7 * abs(lml)  # (flat when c·σ²_src carries the noise)


def test_per_layer_kernels_sum_to_the_ntk():
    model, x, y, xs = problem(n=20)
    from fntk.gp.network import layer_kernels, layer_linearizations

    lin = fntk.Linearized(model)
    lin.check_input(x)
    Ks = layer_kernels(layer_linearizations(lin), x, xs, 0, "auto")
    J, Js = dense_jacobian(model, x)[:, 0], dense_jacobian(model, xs)[:, 0]
    assert Ks.shape == (3, 20, 7)
    assert rel_err(Ks.sum(0), J @ Js.T) <= 1e-12
    J0 = dense_jacobian(model, x, ["0.weight", "0.bias"])[:, 0]
    assert rel_err(Ks[0], J0 @ dense_jacobian(model, xs, ["0.weight", "0.bias"])[:, 0].T) <= 1e-12


def loo_by_refits(M, H, r0):
    """Σ_i log N(r0_i | h_iᵀβ̂_−i + m_iᵀM_−i⁻¹(r0_−i − H_−iβ̂_−i), M_ii − m_iᵀM_−i⁻¹m_i), each term
    an explicit GLS + GP refit on the other n − 1 points (data units)."""
    n, total = M.shape[0], 0.0
    for i in range(n):
        keep = torch.arange(n) != i
        Mo, Ho, ro = M[keep][:, keep], H[keep], r0[keep]
        Mi = torch.linalg.inv(Mo)
        beta = torch.linalg.solve(Ho.T @ Mi @ Ho, Ho.T @ Mi @ ro)
        m = M[keep, i]
        mu = H[i] @ beta + m @ Mi @ (ro - Ho @ beta)
        var = M[i, i] - m @ Mi @ m
        total += float(-0.5 * (LOG2PI + var.log() + (r0[i] - mu) ** 2 / var))
    return total


@pytest.mark.parametrize("name", ["network", "constant", "scaled", "scaled+rbf", "scaled+rbf@src+hetero"])
def test_closed_form_loo_equals_explicit_refits(name):
    model, x, y, xs = problem(n=25)
    reg = NTKRegressor(model, gp_model=name, variance_output=1, hyperprior=True).fit(x, y)
    *_, M, H, r0 = reference_posterior(reg, model, x, y, xs)
    assert reg.model_scores_[name]["loo"] == pytest.approx(loo_by_refits(M, H, r0), rel=1e-9, abs=1e-9)


def test_choice_takes_the_best_score_of_its_criterion():
    model, x, y, xs = problem(n=30)
    for criterion in ("loo", "evidence", "marglik"):
        reg = NTKRegressor(model, criterion=criterion, variance_output=1).fit(x, y)
        scores = reg.model_scores_
        assert set(scores) == {m.name for m in default_candidates(True)}
        assert reg.model_ == max(scores, key=lambda k: scores[k][criterion])
        # the chosen model is the one the explicit option fits (same hyperpriors)
        one = NTKRegressor(model, gp_model=reg.model_, variance_output=1, hyperprior=True).fit(x, y)
        assert rel_err(one.predict(xs).mean, reg.predict(xs).mean) <= 1e-12
        assert one.model_scores_[reg.model_] == pytest.approx(scores[reg.model_], rel=1e-9)
    pair = NTKRegressor(model, gp_model=["constant", "scaled+rbf"]).fit(x, y)
    assert set(pair.model_scores_) == {"constant", "scaled+rbf"}


def test_plain_model_where_the_choice_does_not_apply():
    model, x, y, xs = problem(n=30)
    plain = NTKRegressor(model, mean="network").fit(x, y)
    for kw in ({"output": None}, {"space": "weight"}, {"optimize": ("scale", "noise")}, {"scale": 0.3}):
        yy = y[:, None].expand(-1, 2) if kw.get("output", 0) is None else y
        reg = NTKRegressor(model, **kw).fit(x, yy)
        assert reg.model_ == "network" and reg.model_scores_ == {}
    assert NTKRegressor(model).fit(x[:4], y[:4]).model_ == "network"  # too few points to choose
    auto = NTKRegressor(model).fit(x, y)
    assert auto.model_ in auto.model_scores_ and plain.model_scores_ == {}


def test_scaled_mean_agrees_across_spaces():
    model, x, y, xs = problem(n=40, width=3, k=1)  # p = 25 < n
    f = NTKRegressor(model, mean="scaled", space="function").fit(x, y)
    w = NTKRegressor(model, mean="scaled", space="weight").fit(x, y)
    assert w.space_ == "weight"
    for attr in ("scale_", "noise_", "constant_", "slope_"):
        assert getattr(f, attr) == pytest.approx(getattr(w, attr), rel=1e-6)
    assert f.log_marginal_likelihood() == pytest.approx(w.log_marginal_likelihood(), rel=1e-8)
    assert rel_err(f.predict(xs).mean, w.predict(xs).mean) <= 1e-6
    mean, cov, _, lml, (a, b), *_ = reference_posterior(w, model, x, y, xs)
    assert rel_err(w.predict(xs).mean, mean) <= 1e-8 and w.slope_ == pytest.approx(a, rel=1e-8)


def test_source_variance_predictive_and_sampling():
    model, x, y, xs = problem(n=20)
    reg = NTKRegressor(model, gp_model="network+hetero", variance_output=1, variance_link="softplus")
    reg.fit(x, y)
    post = reg.predict(xs)
    hp = reg.hyperparameters_
    with torch.no_grad():
        v = F.softplus(model(xs)[:, 1])
    assert rel_err(post.noise, hp["noise"] + hp["noise_multiplier"] * v) <= 1e-12
    draws = post.sample(20000, predictive=True, generator=torch.Generator().manual_seed(0))
    assert rel_err(draws.var(0), post.predictive_variance) < 0.05


def test_laplace_evidence_hessian_and_integral():
    from fntk.gp import priors

    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=F64)
    u0 = torch.tensor([0.3, -0.2], dtype=F64)
    H = priors.hessian(lambda u: -0.5 * (u - u0) @ A @ (u - u0), u0)
    assert rel_err(H, -A) <= 1e-8
    # β integrated exactly: log N(z | 0, M + HHᵀ) from the profiled pieces, against the dense density
    g = torch.Generator().manual_seed(0)
    n = 12
    B = torch.randn(n, n, dtype=F64, generator=g)
    M = B @ B.T + 0.5 * torch.eye(n, dtype=F64)
    Hm = torch.stack([torch.ones(n, dtype=F64), torch.randn(n, dtype=F64, generator=g)], 1)
    z = torch.randn(n, dtype=F64, generator=g) + 3.0
    Minv = torch.linalg.inv(M)
    Q = Hm.T @ Minv @ Hm
    beta = torch.linalg.solve(Q, Hm.T @ Minv @ z)
    r = z - Hm @ beta
    lml = float(-0.5 * (r @ Minv @ r + torch.logdet(M) + n * LOG2PI))
    C = M + Hm @ Hm.T
    exact = float(-0.5 * (z @ torch.linalg.solve(C, z) + torch.logdet(C) + n * LOG2PI))
    assert priors.integrated_beta(lml, beta, Q) == pytest.approx(exact, rel=1e-12)
    # a Gaussian integrand in u: Laplace is exact, ∫ exp(c − ½ (u−u0)ᵀA(u−u0)) du = e^c·2π/√det A
    ev = priors.laplace_evidence(lml, 1.5, lambda u: lml + 1.5 - 0.5 * (u - u0) @ A @ (u - u0), u0, beta, Q)
    assert ev == pytest.approx(exact + 1.5 + math.log(2 * math.pi) - 0.5 * math.log(5.0), rel=1e-8)


def test_round_trip_of_composite_models(tmp_path):
    model, x, y, xs = problem(n=20)
    for name in ("scaled+rbf+layers", "scaled+rbf@src+hetero"):
        reg = NTKRegressor(model, gp_model=name, variance_output=1).fit(x, y)
        path = tmp_path / f"{name}.fntk"
        reg.save(path)
        back = fntk.load(path, model)
        a, b = reg.predict(xs), back.predict(xs)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)
        assert torch.equal(a.predictive_variance, b.predictive_variance)
        assert back.model_ == name and back.hyperparameters_ == reg.hyperparameters_


def test_bad_model_options_are_refused():
    model, x, y, xs = problem(n=20)
    cases = [
        (dict(gp_model="scaled+rbff"), ValueError, r"unknown or repeated part 'rbff'.*'rbf', 'matern52'"),
        (dict(gp_model="linear"), ValueError, r"unknown mean 'linear'.*\('network', 'constant', 'scaled'\)"),
        (dict(mean="zero"), ValueError, r"mean must be one of \('network', 'constant', 'scaled'\)"),
        (dict(mean="network", gp_model="scaled"), ValueError, "either mean="),
        (dict(criterion="aic"), ValueError, r"criterion must be one of \('loo', 'evidence', 'marglik'\)"),
        (dict(variance_link="relu"), ValueError,
         r"variance_link must be one of \('softplus', 'exp', 'identity'\)"),
        (dict(gp_model=["scaled", "scaled"]), ValueError, "repeat"),
        (dict(gp_model=3), TypeError, "gp_model must be"),
        (dict(variance_output="1"), TypeError, "variance_output must be an int"),
        (dict(hyperprior="yes"), TypeError, "hyperprior"),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            NTKRegressor(model, **kw)
    with pytest.raises(ValueError, match=r"variance_output=2: the network has no output 2 \(it has k=2"):
        NTKRegressor(model, gp_model="network+hetero", variance_output=2).fit(x, y)
    one = tanh_mlp(d_in=2, width=4, k=1).to(F64)
    with pytest.raises(ValueError, match=r"variance_output=1: the network has no output 1 \(it has k=1"):
        NTKRegressor(one, variance_output=1).fit(x, y)
    with pytest.raises(ValueError, match="needs the source network's variance output: pass variance_output"):
        NTKRegressor(model, gp_model="network+hetero").fit(x, y)
    with pytest.raises(ValueError, match="model 'scaled\\+rbf' needs one output"):
        NTKRegressor(model, gp_model="scaled+rbf", output=None).fit(x, torch.stack([y, y], 1))
    with pytest.raises(ValueError, match="needs every hyperparameter learned"):
        NTKRegressor(model, gp_model="scaled+rbf", optimize=False).fit(x, y)
    with pytest.raises(ValueError, match="needs the direct solver"):
        NTKRegressor(model, mean="scaled", solver="iterative").fit(x, y)
    # a time limit above the plain fit's estimate but below the composite search's
    plain = NTKRegressor(model, mean="network").fit(x, y).estimated_seconds_["function"]
    limit = 2 * plain
    assert fntk.gp.plan.choice_seconds([GPModel.parse("scaled+rbf")], 20) > limit
    with pytest.raises(fntk.TimeLimitError, match="1 composite model"):
        NTKRegressor(model, gp_model="scaled+rbf", time_limit=limit).fit(x, y)


def test_interrupted_choice_leaves_the_regressor_unchanged():
    model, x, y, xs = problem(n=20)
    reg = NTKRegressor(model).fit(x, y)
    before = reg.predict(xs).mean.clone()
    state = dict(vars(reg))

    def stop(info):
        if info["step"] == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reg.fit(x, -y, callback=stop)
    assert vars(reg).keys() == state.keys() and all(vars(reg)[k] is state[k] for k in state)
    assert torch.equal(reg.predict(xs).mean, before)


def test_kept_candidates_are_the_explicit_fits():
    model, x, y, xs = problem(n=25)
    reg = NTKRegressor(model, variance_output=1, keep_candidates=True).fit(x, y)
    assert set(reg.candidates_) == set(reg.model_scores_)
    assert torch.equal(reg.candidates_[reg.model_].predict(xs).mean, reg.predict(xs).mean)
    for name, cand in reg.candidates_.items():
        one = NTKRegressor(model, gp_model=name, variance_output=1, hyperprior=True).fit(x, y)
        a, b = cand.predict(xs), one.predict(xs)
        assert rel_err(a.mean, b.mean) <= 1e-12
        assert rel_err(a.predictive_variance, b.predictive_variance) <= 1e-12
        assert cand.model_ == name and cand.log_marginal_likelihood() == pytest.approx(
            one.log_marginal_likelihood(), rel=1e-12)


def test_fits_inside_cached_kernels_leave_the_cached_kernel_intact():
    """Several regressors on the same float64 inputs inside fntk.ntk.cached_kernels() (the cached
    kernel is the very tensor each fit receives): each equals its fit outside the cache."""
    model, x, y, xs = problem(n=25)
    lin = fntk.Linearized(model)
    kinds = [dict(mean="network"), dict(), dict(mean="constant"), dict(gp_model="scaled+rbf")]
    outside = [NTKRegressor(lin, **kw).fit(x, y).predict(xs).mean for kw in kinds]
    with fntk.ntk.cached_kernels():
        inside = [NTKRegressor(lin, **kw).fit(x, y).predict(xs).mean for kw in kinds * 2]
    for a, b in zip(outside * 2, inside):
        assert rel_err(b, a) <= 1e-12


def test_median_lengthscales_equal_the_pairwise_median_without_the_pairwise_tensor():
    """The initial lengthscales: per-dimension median |u_id − u_jd| (ARD, d ≤ 32) or the median
    Euclidean distance (shared), over pairs i < j, equal to the explicit (pairs, d) reference; the
    shared case on 1,200 points of 2,025 features stays O(n²) (the pairwise tensor would be 12 GB)."""
    torch.manual_seed(0)
    for n, d in ((40, 3), (40, 32), (40, 33), (2, 5)):
        U = torch.randn(n, d, dtype=torch.float64) * torch.linspace(0.5, 3, d, dtype=torch.float64)
        i, j = torch.triu_indices(n, n, 1)
        diff = U[i] - U[j]
        ref = diff.abs().median(0).values if d <= kernels.ARD_MAX_DIMS else diff.norm(dim=-1).median()[None]
        assert rel_err(kernels.median_lengthscales(U), ref) < 1e-13
    U = torch.randn(1200, 2025, dtype=torch.float64)
    ls = kernels.median_lengthscales(U)
    assert ls.shape == (1,) and abs(float(ls) - math.sqrt(2 * 2025)) / math.sqrt(2 * 2025) < 0.01
