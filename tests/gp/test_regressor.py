"""NTKRegressor against a dense float64 reference GP (explicit Jacobian + Cholesky)."""

import math
import warnings

import pytest
import torch

import fntk
from fntk.gp import NotFittedError, NTKRegressor

from models import tanh_mlp
from reference import assert_same_fingerprint, dense_jacobian, fingerprint, rel_err

F64 = torch.float64
SOLVERS = [("function", "direct"), ("weight", "direct"), ("function", "iterative"), ("weight", "iterative")]
EXACT = {"cg_tolerance": 1e-10, "lanczos_iterations": 400}  # iterative: CG to 1e-10, full Krylov space


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_gp(model, x, y, xs, s, noise, b, output=0, mean="network"):
    """Exact GP posterior and log marginal likelihood from explicit float64 Jacobians."""
    J, Js = dense_jacobian(model, x)[:, output], dense_jacobian(model, xs)[:, output]
    with torch.no_grad():
        f = model(x)[:, output] if mean == "network" else torch.zeros(x.shape[0], dtype=F64)
        fs = model(xs)[:, output] if mean == "network" else torch.zeros(xs.shape[0], dtype=F64)
    n = x.shape[0]
    L = torch.linalg.cholesky(s * J @ J.T + noise * torch.eye(n, dtype=F64))
    r = y - f - b
    alpha = torch.cholesky_solve(r[:, None], L)[:, 0]
    W = torch.linalg.solve_triangular(L, s * J @ Js.T, upper=False)
    cov = s * Js @ Js.T - W.T @ W
    lml = -0.5 * r @ alpha - L.diagonal().log().sum() - 0.5 * n * math.log(2 * math.pi)
    return fs + b + s * Js @ J.T @ alpha, cov, float(lml)


def problem(n=40, width=8, k=1, seed=0, d=2):
    torch.manual_seed(seed)
    model = tanh_mlp(d_in=d, width=width, k=k).to(F64)
    x = torch.randn(n, d, dtype=F64)
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(n, dtype=F64)
    xs = torch.randn(9, d, dtype=F64)
    return model, x, y, xs


@pytest.mark.parametrize("space,solver", SOLVERS)
@pytest.mark.parametrize("shape", [(40, 8), (60, 3)], ids=["n<p", "n>p"])
def test_given_hyperparameters_match_reference(space, solver, shape):
    n, width = shape
    model, x, y, xs = problem(n=n, width=width)
    fp = fingerprint(model)
    s, noise, b = 0.7, 0.05, 0.3
    mean, cov, lml = reference_gp(model, x, y, xs, s, noise, b)
    reg = NTKRegressor(
        model,
        space=space,
        solver=solver,
        noise=noise,
        scale=s,
        constant=b,
        optimize=False,
        solver_options=EXACT,
    ).fit(x, y)
    post = reg.predict(xs)
    assert (reg.space_, reg.solver_) == (space, solver)
    tol = 1e-8 if solver == "direct" else 1e-6
    assert rel_err(post.mean, mean) <= tol
    assert rel_err(post.variance, cov.diagonal()) <= tol
    assert rel_err(post.covariance_matrix, cov) <= tol
    assert rel_err(post.predictive_variance, cov.diagonal() + noise) <= tol
    assert abs(reg.log_marginal_likelihood() - lml) <= tol * abs(lml)
    assert (reg.scale_, reg.noise_, reg.constant_) == pytest.approx((s, noise, b), rel=1e-12)
    assert_same_fingerprint(fp, fingerprint(model))


def test_learned_hyperparameters_agree_across_spaces():
    model, x, y, xs = problem(n=50, width=6)
    # the plain model (mean="network"): gp_model="auto" chooses in function space only
    regs = {sp: NTKRegressor(model, space=sp, solver="direct", mean="network").fit(x, y)
            for sp in ("function", "weight")}
    f, w = regs["function"], regs["weight"]
    for attr in ("scale_", "noise_", "constant_"):
        assert getattr(f, attr) == pytest.approx(getattr(w, attr), rel=1e-6)
    assert f.log_marginal_likelihood() == pytest.approx(w.log_marginal_likelihood(), rel=1e-6)
    pf, pw = f.predict(xs), w.predict(xs)
    assert rel_err(pf.mean, pw.mean) <= 1e-6 and rel_err(pf.variance, pw.variance) <= 1e-6
    # the learned optimum is the reference GP's at those values, and a maximum of the evidence
    mean, cov, lml = reference_gp(model, x, y, xs, f.scale_, f.noise_, f.constant_)
    assert rel_err(pf.mean, mean) <= 1e-8 and abs(f.log_marginal_likelihood() - lml) <= 1e-8 * abs(lml)
    for ds, dn in [(1.05, 1), (0.95, 1), (1, 1.05), (1, 0.95)]:
        other = reference_gp(model, x, y, xs, f.scale_ * ds, f.noise_ * dn, f.constant_)[2]
        assert other < lml


def test_iterative_learning_matches_direct():
    model, x, y, xs = problem(n=50, width=6)
    d = NTKRegressor(model, solver="direct", mean="network").fit(x, y)
    i = NTKRegressor(model, space="function", solver="iterative", solver_options=EXACT).fit(x, y)
    assert i.noise_ == pytest.approx(d.noise_, rel=1e-3) and i.scale_ == pytest.approx(d.scale_, rel=1e-3)
    assert rel_err(i.predict(xs).mean, d.predict(xs).mean) <= 1e-4


def test_recovers_noise_level():
    """Data drawn from the linearized model itself with σ = 0.1: the learned σ is within 20%."""
    torch.manual_seed(1)
    model = tanh_mlp(d_in=3, width=16).to(F64)
    lin = fntk.Linearized(model)
    n = 500
    x = torch.randn(n, 3, dtype=F64)
    w = lin.theta + 0.5 * torch.randn(lin.num_params, dtype=F64)
    y = lin(x, w)[:, 0] + 0.1 * torch.randn(n, dtype=F64)
    reg = NTKRegressor(model).fit(x, y)
    assert abs(math.sqrt(reg.noise_) - 0.1) <= 0.02
    assert reg.scale_ == pytest.approx(0.25, rel=0.5)


def test_heteroscedastic_two_output_net_uses_output_0():
    """A (mean, raw variance) net: the kernel and prior mean use output 0 only."""
    model, x, y, xs = problem(n=30, width=8, k=2)
    s, noise, b = 0.5, 0.02, -0.1
    mean, cov, lml = reference_gp(model, x, y, xs, s, noise, b, output=0)
    for space, solver in SOLVERS:  # weight/iterative: the output-selecting Jᵀ(J v) operator
        reg = NTKRegressor(
            model,
            output=0,
            space=space,
            solver=solver,
            scale=s,
            noise=noise,
            constant=b,
            optimize=False,
            solver_options=EXACT,
        ).fit(x, y)
        post = reg.predict(xs)
        tol = 1e-8 if solver == "direct" else 1e-6
        assert rel_err(post.mean, mean) <= tol and rel_err(post.variance, cov.diagonal()) <= tol
        assert abs(reg.log_marginal_likelihood() - lml) <= tol * abs(lml)
    learned = NTKRegressor(model, output=0).fit(x, y)
    assert learned.predict(xs).mean.shape == (9,)


def test_multi_output_independent_gps():
    model, x, _, xs = problem(n=35, width=6, k=3)
    Y = torch.stack([torch.sin(x[:, 0]), x[:, 1] ** 2, torch.cos(x[:, 0] * x[:, 1])], dim=1)
    Y = Y + 0.05 * torch.randn(Y.shape, dtype=F64)
    for space in ("function", "weight"):
        reg = NTKRegressor(model, output=None, space=space).fit(x, Y)
        post = reg.predict(xs)
        assert post.mean.shape == (9, 3) and post.variance.shape == (9, 3)
        assert post.covariance_matrix.shape == (3, 9, 9)
        assert reg.log_marginal_likelihood().shape == (3,)
        for c in range(3):
            one = NTKRegressor(model, output=c, space=space, mean="network").fit(x, Y[:, c])
            p1 = one.predict(xs)
            assert rel_err(post.mean[:, c], p1.mean) <= 1e-6
            assert rel_err(post.variance[:, c], p1.variance) <= 1e-6
            assert float(reg.noise_[c]) == pytest.approx(one.noise_, rel=1e-6)
            mean, cov, lml = reference_gp(
                model, x, Y[:, c], xs, one.scale_, one.noise_, one.constant_, output=c
            )
            assert rel_err(p1.mean, mean) <= 1e-8 and abs(one.log_marginal_likelihood() - lml) <= 1e-8 * abs(
                lml
            )


def test_constant_mean_option():
    model, x, y, xs = problem(n=30, width=5)
    mean, cov, lml = reference_gp(model, x, y, xs, 1.3, 0.1, 0.2, mean="constant")
    reg = NTKRegressor(model, mean="constant", scale=1.3, noise=0.1, constant=0.2, optimize=False).fit(x, y)
    post = reg.predict(xs)
    assert rel_err(post.mean, mean) <= 1e-8 and abs(reg.log_marginal_likelihood() - lml) <= 1e-8 * abs(lml)


def test_original_units():
    """Affine changes of y change the fit equivariantly (standardisation is internal)."""
    model, x, y, xs = problem(n=40, width=6)
    a = NTKRegressor(model, mean="constant").fit(x, y)
    b = NTKRegressor(model, mean="constant").fit(x, 10 * y + 3)
    pa, pb = a.predict(xs), b.predict(xs)
    assert rel_err(pb.mean, 10 * pa.mean + 3) <= 1e-6
    assert rel_err(pb.variance, 100 * pa.variance) <= 1e-6
    assert b.noise_ == pytest.approx(100 * a.noise_, rel=1e-6)
    assert b.log_marginal_likelihood() == pytest.approx(
        a.log_marginal_likelihood() - 40 * math.log(10), rel=1e-8
    )


def test_partial_optimisation_keeps_given_values():
    model, x, y, _ = problem(n=30, width=5)
    reg = NTKRegressor(model, noise=0.03, optimize=("scale", "constant")).fit(x, y)
    assert reg.noise_ == pytest.approx(0.03, rel=1e-12)
    free = NTKRegressor(model, mean="network").fit(x, y)
    assert reg.log_marginal_likelihood() <= free.log_marginal_likelihood() + 1e-9


def test_auto_space_choice():
    model, x, y, _ = problem(n=60, width=3)  # p = 29 < n
    assert NTKRegressor(model).fit(x, y).space_ == "weight"
    model, x, y, _ = problem(n=20, width=10)  # p = 151 > n
    assert NTKRegressor(model).fit(x, y).space_ == "function"


def test_posterior_api():
    model, x, y, xs = problem(n=30, width=5)
    post = NTKRegressor(model).fit(x, y).predict(xs)
    lo, hi = post.confidence_region()
    assert torch.allclose(hi - lo, 4 * post.stddev)
    lo2, hi2 = post.confidence_region(predictive=True)
    assert torch.all(hi2 - lo2 > hi - lo)
    g = torch.Generator().manual_seed(0)
    draws = post.sample(4000, generator=g)
    assert draws.shape == (4000, 9)
    assert torch.allclose(draws.mean(0), post.mean, atol=0.1 * float(post.stddev.max()) + 1e-6)
    assert rel_err(torch.cov(draws.T), post.covariance_matrix) < 0.15
    assert post.sample(2, predictive=True).shape == (2, 9)
    mvn = post.to_gpytorch()
    assert torch.allclose(mvn.mean, post.mean) and torch.allclose(mvn.variance, post.variance)


def test_errors():
    model, x, y, xs = problem(n=20, width=4)
    reg = NTKRegressor(model)
    with pytest.raises(NotFittedError, match="fit"):
        reg.predict(xs)
    with pytest.raises(ValueError, match=r"y has 19 rows .* n=20 .* shape \(20,\)"):
        reg.fit(x, y[:-1])
    bad = y.clone()
    bad[7] = float("nan")
    with pytest.raises(ValueError, match="y contains NaN or Inf .*index 7"):
        reg.fit(x, bad)
    with pytest.raises(ValueError, match=r"y must have shape \(20,\)"):
        reg.fit(x, torch.stack([y, y], 1))
    with pytest.raises(
        ValueError, match=r"space must be one of \('auto', 'function', 'weight'\), got 'kernel'"
    ):
        NTKRegressor(model, space="kernel")
    with pytest.raises(ValueError, match="method must be one of"):
        NTKRegressor(model, method="fast")
    with pytest.raises(ValueError, match="solver must be one of"):
        NTKRegressor(model, solver="cholesky")
    with pytest.raises(ValueError, match="mean must be one of"):
        NTKRegressor(model, mean="zero")
    with pytest.raises(ValueError, match="noise must be a positive"):
        NTKRegressor(model, noise=-1.0)
    with pytest.raises(ValueError, match="optimize: unknown hyperparameter"):
        NTKRegressor(model, optimize=("lengthscale",))
    with pytest.raises(ValueError, match="output=3 is out of range"):
        NTKRegressor(model, output=3).fit(x, y)
    with pytest.raises(ValueError, match="x contains NaN"):
        reg.fit(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="solver_options: unknown key"):
        NTKRegressor(model, solver_options={"tol": 1e-3})


def test_fingerprint_and_exports():
    model, x, y, xs = problem(n=25, width=4)
    model.train()
    fp = fingerprint(model)
    for space in ("function", "weight"):
        cov = NTKRegressor(model, space=space).fit(x, y).predict(xs).covariance_matrix
        assert cov.shape == (9, 9)
    assert_same_fingerprint(fp, fingerprint(model))
    assert fntk.NTKRegressor is NTKRegressor


@pytest.mark.parametrize("predictive", [False, True])
def test_posterior_samples_have_the_posterior_covariance(predictive):
    """NTKPosterior.sample: f = μ + A ε with A Aᵀ = Σ exactly (the eigen root; ε from the generator
    as documented), so a repeated test point gets identical draws (its Σ is singular: no jitter)
    and the empirical covariance of many draws approaches Σ (+ σ² I for y*). Measured here: the
    repeated point's draws agree to 3e-8 relative (1.5e-5 with the former Cholesky + jitter, which
    also warned on every call) and A Aᵀ = Σ to 1e-15 (4.6e-11)."""
    model, x, y, xs = problem()
    xs = torch.cat([xs, xs[:2]])  # two repeated test points: a singular covariance
    reg = NTKRegressor(model, noise=0.05, scale=0.7, optimize=False, gp_model="network").fit(x, y)
    post = reg.predict(xs)
    cov = post.covariance_matrix
    if predictive:
        cov = cov + 0.05 * torch.eye(cov.shape[0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no jitter warning for the singular Σ
        F = post.sample(4, predictive=predictive, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(1, 11, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    ev, Q = torch.linalg.eigh(0.5 * (cov + cov.T))
    A = Q * ev.clamp_min(0).sqrt()
    assert rel_err(F, (A @ eps[0]).T + post.mean) <= 1e-12
    if not predictive:
        assert rel_err(F[:, 9:], F[:, :2]) <= 1e-6
    many = post.sample(40_000, predictive=predictive, generator=torch.Generator().manual_seed(4))
    emp = torch.cov((many - post.mean).T, correction=0)
    assert float((emp - cov).abs().max()) <= 0.03 * float(cov.diagonal().max())
