"""Property-based tests (hypothesis) over random small MLPs/CNNs, output counts and parameter subsets.

- the empirical NTK is symmetric positive semi-definite and equals the dense float64 J Jᵀ;
- every NTK method (structured, contraction, products) agrees;
- JacobianOperator and NTKOperator products match the dense matrices;
- NTKRegressor in weight space equals function space at fixed hyperparameters.

Examples are few and small (bounded ``max_examples``) so the file runs in well under a minute.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fntk

from reference import dense_jacobian

F64 = torch.float64
SETTINGS = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}


@st.composite
def networks(draw, max_k: int = 3):
    """(model, x1, x2, selected names): an MLP or a small CNN in float64 with a random subset."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    k = draw(st.integers(1, max_k))
    act = ACTS[draw(st.sampled_from(sorted(ACTS)))]
    if draw(st.booleans()):
        d = draw(st.integers(1, 4))
        widths = draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))
        layers, prev = [], d
        for w in widths:
            layers += [nn.Linear(prev, w), act()]
            prev = w
        model = nn.Sequential(*layers, nn.Linear(prev, k))
        shape: tuple[int, ...] = (d,)
    else:
        c, s = draw(st.integers(1, 2)), draw(st.integers(3, 5))
        ch = draw(st.integers(1, 3))
        model = nn.Sequential(nn.Conv2d(c, ch, 3, padding=1), act(), nn.Flatten(), nn.Linear(ch * s * s, k))
        shape = (c, s, s)
    model = model.to(F64)
    names = [n for n, _ in model.named_parameters()]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    g = torch.Generator().manual_seed(seed)
    n1, n2 = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    x1 = torch.randn(n1, *shape, generator=g, dtype=F64)
    x2 = torch.randn(n2, *shape, generator=g, dtype=F64)
    return model, x1, x2, [n for n in names if n in chosen]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return bool((a - b).abs().max() <= tol * (1 + b.abs().max()))


@SETTINGS
@given(networks())
def test_kernel_symmetric_psd_and_methods_agree(net):
    model, x1, x2, names = net
    lin = fntk.Linearized(model, names)
    J1, J2 = dense_jacobian(model, x1, names), dense_jacobian(model, x2, names)
    n1, k, _ = J1.shape
    ref = torch.einsum("akp,blp->akbl", J1, J2)
    ref_full = ref if k > 1 else ref[:, 0, :, 0]  # k == 1: (n1, n2)
    for method in ("structured", "contraction", "products", "auto"):
        K11 = fntk.ntk(lin, x1, method=method, outputs="full").reshape(n1 * k, n1 * k)
        assert torch.equal(K11, K11.T) or _close(K11, K11.T, 1e-12)
        ev = torch.linalg.eigvalsh(0.5 * (K11 + K11.T))
        assert float(ev.min()) >= -1e-10 * (1 + float(ev.abs().max()))
        K12 = fntk.ntk(lin, x1, x2, method=method, outputs="full")
        assert _close(K12, ref_full), method
        if k > 1:
            ind = fntk.ntk(lin, x1, x2, method=method, outputs="independent")
            assert _close(ind, torch.einsum("akbk->kab", ref)), method


@SETTINGS
@given(networks(), st.integers(1, 3))
def test_operators_match_dense(net, r):
    model, x1, x2, names = net
    lin = fntk.Linearized(model, names)
    J = dense_jacobian(model, x1, names)
    n, k, p = J.shape
    Jm = J.reshape(n * k, p)
    g = torch.Generator().manual_seed(r)
    V = torch.randn(p, r, generator=g, dtype=F64)
    U = torch.randn(n * k, r, generator=g, dtype=F64)
    Jop = fntk.JacobianOperator(lin, x1)
    assert Jop.shape == (n * k, p)
    assert _close(Jop.matmul(V), Jm @ V)
    assert _close(Jop.mT.matmul(U), Jm.T @ U)
    for dense in (False, True):
        K = fntk.NTKOperator(lin, x1, dense=dense)
        assert _close(K.matmul(U), Jm @ (Jm.T @ U))
        assert _close(K.to_dense(), Jm @ Jm.T)
    J2 = dense_jacobian(model, x2, names).reshape(-1, p)
    K12 = fntk.NTKOperator(lin, x1, x2)
    W = torch.randn(J2.shape[0], r, generator=g, dtype=F64)
    assert _close(K12.matmul(W), Jm @ (J2.T @ W))


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(networks(max_k=2), st.floats(0.05, 2.0), st.floats(1e-3, 0.5), st.integers(0, 1))
def test_weight_space_equals_function_space(net, scale, noise, output):
    model, x1, x2, names = net
    lin = fntk.Linearized(model, names)
    k = lin.forward(x1).shape[1]
    output = min(output, k - 1)
    g = torch.Generator().manual_seed(7)
    x = torch.cat([x1, x2])
    y = torch.randn(x.shape[0], dtype=F64, generator=g)
    kw = dict(params=names, output=output, optimize=False, scale=scale, noise=noise, solver="direct")
    fs = fntk.NTKRegressor(model, space="function", **kw).fit(x, y)
    ws = fntk.NTKRegressor(model, space="weight", **kw).fit(x, y)
    xt = x2 + 0.3
    a, b = fs.predict(xt), ws.predict(xt)
    assert _close(a.mean, b.mean, 1e-7)
    assert _close(a.variance, b.variance, 1e-7)
    assert abs(fs.log_marginal_likelihood() - ws.log_marginal_likelihood()) <= 1e-7 * (
        1 + abs(fs.log_marginal_likelihood())
    )
