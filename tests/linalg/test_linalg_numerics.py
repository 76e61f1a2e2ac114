"""Numerical safeguards: warned jitter escalation, checked CG with a direct fallback, the float32
precision policy, and reproducibility for a given seed."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from linear_operator.utils.linear_cg import linear_cg

import fntk
from fntk.errors import NumericalWarning
from fntk.linalg import check_cg, gram, safe_cholesky

from models import tanh_mlp

F64 = torch.float64


def _jitter(record) -> float:
    msgs = [
        str(w.message)
        for w in record
        if issubclass(w.category, RuntimeWarning) and "jitter" in str(w.message)
    ]
    assert msgs, "no jitter warning"
    return float(re.search(r"jitter (?:of )?([0-9.]+e[-+][0-9]+)", msgs[0]).group(1))


def test_safe_cholesky_escalates_and_states_the_jitter():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 3, dtype=F64, generator=g)
    A = B @ B.T  # rank 3: singular
    with pytest.warns(NumericalWarning, match="added jitter") as rec:
        L = safe_cholesky(A, "test matrix")
    eps = _jitter(rec)
    scale = float(A.diagonal().mean())
    assert 1e-10 * scale * 0.999 <= eps <= 1e-2 * scale
    # the factor is of A + jitter·I, exactly the amount stated (to the printed 4 digits)
    assert torch.allclose(L @ L.T, A + eps * torch.eye(6, dtype=F64), rtol=0, atol=1e-3 * eps + 1e-12 * scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L = safe_cholesky(A + torch.eye(6, dtype=F64))  # PD: no jitter, no warning
    assert torch.allclose(L @ L.T, A + torch.eye(6, dtype=F64))


def test_safe_cholesky_refuses_nan_and_indefinite():
    with pytest.raises(ValueError, match="NaN or Inf"):
        safe_cholesky(torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=F64), "K")
    with pytest.raises(ValueError, match="not positive definite even with jitter"):
        safe_cholesky(-torch.eye(3, dtype=F64), "K")


def test_regressor_tiny_noise_on_duplicated_points_warns_with_jitter():
    torch.manual_seed(0)
    m = tanh_mlp(d_in=2, width=4, k=1, depth=1).to(F64)
    x = torch.randn(30, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = torch.cat([x, x])  # a singular kernel (duplicates, and n > p = 17)
    y = torch.sin(x[:, 0])
    reg = fntk.NTKRegressor(m, space="function", solver="direct", optimize=False, noise=1e-30)
    with pytest.warns(RuntimeWarning, match="jitter") as rec:
        reg.fit(x, y)
    assert _jitter(rec) > 0
    mean = reg.predict(x[:5]).mean
    assert torch.isfinite(mean).all()
    assert torch.allclose(mean, y[:5], atol=0.5)  # interpolates the (noise-free) targets closely


def test_check_cg_warns_with_residual_and_falls_back_to_direct():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=F64, generator=g))
    M = Q @ torch.diag(torch.logspace(-4, 2, 40, dtype=F64)) @ Q.T  # condition number 1e6
    b = torch.randn(40, dtype=F64, generator=g)
    with warnings.catch_warnings():  # linear_cg warns itself; fntk adds the repair
        warnings.simplefilter("ignore")
        sol = linear_cg(lambda V: M @ V, b[:, None], tolerance=1e-10, max_iter=2, max_tridiag_iter=2)[:, 0]
    res0 = float((b - M @ sol).norm() / b.norm())
    assert res0 > 1e-3  # two iterations are far from converged
    with pytest.warns(NumericalWarning, match="relative residual") as rec:
        fixed = check_cg(lambda V: M @ V, b, sol, 1e-10, memory_budget=2**20, what="test CG")
    msg = str(rec[0].message)
    assert f"{res0:.3e}" in msg and "direct solve" in msg
    assert torch.allclose(fixed, torch.linalg.solve(M, b), rtol=1e-6)
    # when the dense matrix does not fit the budget the CG result is kept (and still warned)
    with pytest.warns(NumericalWarning, match="keeping the CG result"):
        kept = check_cg(lambda V: M @ V, b, sol, 1e-10, memory_budget=1000)
    assert torch.equal(kept, sol)
    # a converged solution passes silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = torch.linalg.solve(M, b)
        assert torch.equal(check_cg(lambda V: M @ V, b, exact, 1e-8, 2**20), exact)


def test_float32_model_matches_float64_within_single_precision():
    """Precision policy: network products in the model's dtype, all factorisations and solves in
    float64; a float32 model's GP predictions agree with the float64 model's to ~float32 accuracy."""
    torch.manual_seed(0)
    m64 = tanh_mlp(d_in=3, width=16, k=1).to(F64)
    m32 = tanh_mlp(d_in=3, width=16, k=1)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 3, dtype=F64, generator=g)
    y = torch.sin(x.sum(1))
    xt = torch.randn(10, 3, dtype=F64, generator=g)
    kw = dict(optimize=False, scale=1.0, noise=1e-2, space="function", solver="direct")
    p64 = fntk.NTKRegressor(m64, **kw).fit(x, y).predict(xt)
    p32 = fntk.NTKRegressor(m32, **kw).fit(x.float(), y.float()).predict(xt.float())
    assert p32.mean.dtype == F64  # results come back in float64
    assert torch.allclose(p32.mean, p64.mean, rtol=0, atol=1e-4 * float(p64.mean.abs().max()))
    assert torch.allclose(p32.variance, p64.variance, rtol=1e-3, atol=1e-6)


def test_same_seed_same_predictions():
    torch.manual_seed(0)
    m = tanh_mlp(d_in=3, width=8, k=3).to(F64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 3, dtype=F64, generator=g)
    xt = torch.randn(6, 3, dtype=F64, generator=g)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    kw = dict(inference="vi", vi_max_iter=20, vi_rank=6, vi_samples=8, num_samples=16, prior_precision=1.0)
    a = fntk.LinearizedClassifier(m, seed=3, **kw).fit(x, labels).predict_proba(xt)
    torch.manual_seed(123)  # the global RNG state does not matter, only the seed
    b = fntk.LinearizedClassifier(m, seed=3, **kw).fit(x, labels).predict_proba(xt)
    c = fntk.LinearizedClassifier(m, seed=4, **kw).fit(x, labels).predict_proba(xt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed is actually used by the Monte Carlo parts
    m1 = tanh_mlp(d_in=3, width=8, k=1).to(F64)
    y = torch.sin(x[:, 0])
    opts = dict(
        space="function",
        solver="iterative",
        solver_options={"seed": 5, "num_probes": 4, "lanczos_iterations": 10},
    )
    r1 = fntk.NTKRegressor(m1, **opts).fit(x, y).predict(xt)
    torch.manual_seed(7)
    r2 = fntk.NTKRegressor(m1, **opts).fit(x, y).predict(xt)
    assert torch.equal(r1.mean, r2.mean) and torch.equal(r1.variance, r2.variance)


@pytest.mark.filterwarnings("ignore:CG terminated")  # linear_cg's own note on the capped run: expected here
@pytest.mark.parametrize("space", ["function", "weight"])
def test_regressor_cg_cap_warns_and_falls_back_to_direct(space):
    """A tiny CG iteration cap: the regressor warns with the residual and repairs the solve
    directly (the system fits the memory budget), matching the direct solver's predictions."""
    torch.manual_seed(0)
    m = tanh_mlp(d_in=3, width=8, k=1).to(F64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, dtype=F64, generator=g)
    y = torch.sin(2 * x[:, 0])
    xt = torch.randn(5, 3, dtype=F64, generator=g)
    kw = dict(space=space, optimize=False, scale=1.0, noise=1e-4)
    opts = {"max_cg_iterations": 2, "lanczos_iterations": 10}  # the minimum (fewer are refused)
    with pytest.warns(NumericalWarning, match="relative residual") as rec:
        it = fntk.NTKRegressor(m, solver="iterative", solver_options=opts, **kw).fit(x, y)
    assert any("direct solve" in str(w.message) for w in rec)
    direct = fntk.NTKRegressor(m, solver="direct", **kw).fit(x, y)
    assert torch.allclose(it.predict(xt).mean, direct.predict(xt).mean, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("n", [5, 300, 517])
def test_gram_is_the_exactly_symmetric_product(n):
    """AᵀA from its lower block columns (1, 2 and 4 blocks), against the float64 product."""

    A = torch.randn(37, n, generator=torch.Generator().manual_seed(n), dtype=F64)
    C = gram(A)
    torch.testing.assert_close(C, A.T @ A, rtol=1e-13, atol=1e-12)
    assert torch.equal(C, C.T)
