"""GGNOperator against dense float64 Σ_i J_iᵀ H_i J_i (J by plain autograd, H by autograd Hessians
of torch.distributions log-probabilities), and the approximate products against the exact one."""

import linear_operator
import pytest
import torch
from torch import nn

import fntk
from fntk import likelihoods as L
from fntk.curvature import hutchinson_diagonal, lanczos_root
from fntk.linearize.taps import analyze
from fntk.operators import ggn_dense, ggn_diagonal

from likelihood_reference import data, fisher_reference, generic_for
from models import make
from reference import assert_same_fingerprint, dense_jacobian, fingerprint, rel_err

TOL = 1e-10
D64 = torch.float64

# likelihood names per output count k of the test models (mlp/tied: 1, cnn/embed: 2, multi: 3)
BY_K = {
    1: ["gaussian", "bernoulli", "poisson"],
    2: ["gaussian", "hetero_softplus", "hetero_exp", "categorical", "poisson"],
    3: ["gaussian", "categorical", "bernoulli", "poisson"],
}
K_OF = {"mlp": 1, "tied": 1, "cnn": 2, "embed": 2, "multi": 3}
CASES = [(c, name) for c, k in K_OF.items() for name in BY_K[k]]


def setup(case, name, n=None, **lin_kw):
    """(model, x, lin, likelihood, y, dense reference G) for a model case and a likelihood; n
    points (default: the case's 6)."""
    model, x, _ = make(case)
    if n is not None:
        x = torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(5), dtype=D64)
    lin = fntk.Linearized(model, **lin_kw)
    J = dense_jacobian(model, x)
    f = lin.forward(x)
    g = torch.Generator().manual_seed(7)
    lik, logp, _, _ = data(name, f.shape[1], g)
    y = torch.cat([data(name, f.shape[1], g)[3] for _ in range(-(-x.shape[0] // 5))])[: x.shape[0]]
    H = fisher_reference(name, logp, f, y)
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J)
    return model, x, lin, lik, y, G


@pytest.mark.parametrize("case,name", CASES)
def test_exact_matches_dense(case, name):
    model, x, lin, lik, y, G = setup(case, name)
    fp = fingerprint(model)
    p = G.shape[0]
    op = fntk.GGNOperator(lin, x, lik)
    assert op.shape == (p, p)
    gen = torch.Generator().manual_seed(0)
    for r in (1, 5):
        V = torch.randn(p, r, generator=gen, dtype=D64)
        assert rel_err(op @ V, G @ V) <= TOL
    v = V[:, 0]
    assert op.matmul(v).shape == (p,) and rel_err(op @ v, G @ v) <= TOL
    B = torch.randn(2, p, 3, generator=gen, dtype=D64)  # batched right-hand sides
    assert rel_err(op.matmul(B), G @ B) <= TOL
    assert rel_err(op.diagonal(), G.diagonal()) <= TOL
    assert rel_err(ggn_diagonal(lin, x, lik, structured=False), G.diagonal()) <= TOL
    assert rel_err(op.to_dense(), G) <= TOL
    assert_same_fingerprint(fp, fingerprint(model))


@pytest.mark.parametrize("case,name", [(c, n) for c, n in CASES if c in ("multi", "cnn", "mlp")])
def test_generic_exact_matches_named(case, name):
    """The generic likelihood (torch.func Hessian of an NLL) gives the named likelihood's G."""
    model, x, lin, lik, y, G = setup(case, name)
    gen = generic_for(name, lin.num_outputs)
    if name == "gaussian":
        gen = gen(lik.sigma)
    V = torch.randn(G.shape[0], 3, dtype=D64)
    if name.startswith("hetero"):  # the Fisher is E_y of the NLL Hessian: two-point quadrature
        d = lin.num_outputs // 2
        mv = lik.inverse_link(lin.forward(x))
        m, s = mv[:, :d], mv[:, d:].sqrt()
        ops = [fntk.GGNOperator(lin, x, gen, y=m + sgn * s) for sgn in (1, -1)]
        assert rel_err(0.5 * (ops[0] @ V + ops[1] @ V), G @ V) <= TOL
        return
    op = fntk.GGNOperator(lin, x, gen, y=y)
    assert rel_err(op @ V, G @ V) <= TOL
    assert rel_err(op.diagonal(), G.diagonal()) <= TOL
    assert rel_err(op.to_dense(), G) <= TOL


def test_generic_against_dense_indefinite():
    """A non-convex generic NLL (indefinite H): exact G still equals Σ JᵀHJ with H by autograd."""
    model, x, _ = make("multi")
    lin = fntk.Linearized(model)
    J = dense_jacobian(model, x)
    y = torch.randn(x.shape[0], 3, dtype=D64)

    def nll(fi, yi):
        return (torch.log1p((fi - yi) ** 2) + 0.1 * fi[0] * fi[1] ** 2).sum()

    f = lin.forward(x)
    H = torch.stack(
        [torch.autograd.functional.hessian(lambda a, i=i: nll(a, y[i]), f[i]) for i in range(len(f))]
    )
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J)
    op = fntk.GGNOperator(lin, x, L.GenericLikelihood(nll), y=y)
    V = torch.randn(G.shape[0], 4, dtype=D64)
    assert rel_err(op @ V, G @ V) <= TOL
    assert rel_err(op.diagonal(), G.diagonal()) <= TOL


def test_structured_diagonal_layers_and_chunking():
    """Per-layer diagonals come from the layer taps (Linear, Conv, BatchNorm called once); tied
    layers fall back; small memory budgets (many chunks) give the same numbers."""
    m, x, _ = make("tied")
    lin = fntk.Linearized(m)
    an = analyze(lin, lin.check_input(x))
    assert {L.weight for L in an.layers} == {"inp.weight", "out.weight"}  # "shared" is applied twice
    assert an.fallback == ["shared.weight", "shared.bias"]
    m, x, _ = make("cnn")
    lin = fntk.Linearized(m)
    an = analyze(lin, lin.check_input(x))
    assert {L.weight for L in an.layers} == {"conv.weight", "bn.weight", "fc.weight"} and not an.fallback
    model, x, lin, lik, y, G = setup("cnn", "categorical", memory_budget=20_000)
    op = fntk.GGNOperator(lin, x, lik)
    assert lin.rows_per_chunk(1) < x.shape[0]  # the products and the diagonal run in several chunks
    V = torch.randn(G.shape[0], 3, dtype=D64)
    assert rel_err(op @ V, G @ V) <= TOL
    assert rel_err(op.diagonal(), G.diagonal()) <= TOL
    assert rel_err(ggn_dense(lin, x, lik), G) <= TOL
    for method in ("finite_difference", "autograd"):
        assert rel_err(fntk.GGNOperator(lin, x, lik, method=method) @ V, G @ V) <= 1e-3


def test_parameter_subset():
    model, x, _ = make("multi")
    names = ["4.weight", "4.bias", "2.weight"]
    lin = fntk.Linearized(model, params=names)
    J = dense_jacobian(model, x, [n for n, _ in model.named_parameters() if n in names])
    H = L.Categorical().hessian(lin.forward(x))
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J)
    op = fntk.GGNOperator(lin, x, L.Categorical())
    V = torch.randn(G.shape[0], 2, dtype=D64)
    assert rel_err(op @ V, G @ V) <= TOL and rel_err(op.diagonal(), G.diagonal()) <= TOL


@pytest.mark.parametrize("case,name", [("multi", "categorical"), ("cnn", "categorical"), ("mlp", "gaussian")])
def test_reduction_mean(case, name):
    model, x, lin, lik, y, G = setup(case, name)
    n = x.shape[0]
    V = torch.randn(G.shape[0], 2, dtype=D64)
    for method in ("exact", "autograd"):
        op = fntk.GGNOperator(lin, x, lik, method=method, reduction="mean")
        assert rel_err(op @ V, G @ V / n) <= 1e-9
    assert rel_err(op.diagonal(), G.diagonal() / n) <= TOL
    assert rel_err(op.to_dense(), G / n) <= TOL
    assert rel_err(ggn_diagonal(lin, x, lik, reduction="mean"), G.diagonal() / n) <= TOL


# ---------------------------------------------------------------------- the paper's products
@pytest.mark.parametrize(
    "case,name",
    [("multi", "categorical"), ("cnn", "categorical"), ("mlp", "gaussian"), ("cnn", "hetero_softplus")],
)
def test_finite_difference_close_and_linear(case, name):
    """The paper's check: forward differences within 4% of exact for ε from 1e-2 to 1e-5, on 40
    points (with 6 points and ε = 1e-2 the ReLU CNN's random directions reach ~8%: kinks crossed
    by the step and the O(ε) term weigh more against a G of rank ≤ 6)."""
    model, x, lin, lik, y, G = setup(case, name, n=40)
    fp = fingerprint(model)
    p = G.shape[0]
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(p, 4, generator=gen, dtype=D64)
    exact = G @ V
    for eps in (1e-2, 1e-3, 1e-4, 1e-5):
        op = fntk.GGNOperator(lin, x, lik, method="finite_difference", eps=eps)
        FV = op @ V
        errs = (FV - exact).norm(dim=0) / exact.norm(dim=0)
        assert float(errs.max()) <= 0.04, (eps, errs)
        # linear in v: F(a v1 + b v2) = a F v1 + b F v2 within 1% from the default ε = 1e-4 up to
        # 1e-3 (at 1e-2 the nonlinearity is of the order of the error itself, ~1-4%); positively
        # homogeneous to round-off (v is normalised), and F(0) = 0
        if eps <= 1e-3:
            a, b = 2.5, -0.7
            comb = op @ (a * V[:, 0] + b * V[:, 1])
            assert rel_err(comb, a * FV[:, 0] + b * FV[:, 1]) <= 0.01
        assert rel_err(op @ (3.0 * V[:, 2]), 3.0 * FV[:, 2]) <= 1e-8
    assert torch.equal(op @ torch.zeros(p, dtype=D64), torch.zeros(p, dtype=D64))
    assert_same_fingerprint(fp, fingerprint(model))


@pytest.mark.parametrize("case", ["multi", "cnn", "embed"])
def test_autograd_equals_exact_categorical(case):
    model, x, lin, lik, y, G = setup(case, "categorical")
    fp = fingerprint(model)
    V = torch.randn(G.shape[0], 5, dtype=D64)
    op = fntk.GGNOperator(lin, x, lik, method="autograd")
    exact = fntk.GGNOperator(lin, x, lik) @ V
    assert rel_err(op @ V, exact) <= 1e-8
    assert rel_err(op @ V, G @ V) <= 1e-8
    assert_same_fingerprint(fp, fingerprint(model))


def test_fingerprint_untouched_with_grads_and_train_mode():
    """Every method, on a model in train mode with .grad set: nothing of the model changes."""
    model, x, _ = make("cnn")
    model.train()
    model(x).sum().backward()
    fp = fingerprint(model)
    lin = fntk.Linearized(model)
    V = torch.randn(lin.num_params, 2, dtype=D64)
    for method in ("exact", "finite_difference", "autograd"):
        op = fntk.GGNOperator(lin, x, L.Categorical(), method=method)
        op @ V
        op.diagonal()
    hutchinson_diagonal(op, 4)
    lanczos_root(op, 2)
    assert_same_fingerprint(fp, fingerprint(model))
    assert model.training


def test_float32_model():
    model, x, _ = make("multi", dtype=torch.float32)
    lin = fntk.Linearized(model)
    G = fntk.GGNOperator(lin, x.double(), L.Categorical())  # inputs cast at the boundary
    V = torch.randn(lin.num_params, 2)
    for method in ("finite_difference", "autograd"):
        out = fntk.GGNOperator(lin, x, L.Categorical(), method=method) @ V
        assert out.dtype == torch.float32
        assert rel_err(out, G @ V) <= (0.05 if method == "finite_difference" else 1e-4)


# ---------------------------------------------------------------------- estimators, roots, solves
def test_lanczos_root_top_eigenpairs():
    model, x, lin, lik, y, G = setup("multi", "categorical")
    op = fntk.GGNOperator(lin, x, lik)
    ref = torch.linalg.eigvalsh(G).flip(0)
    evals, U = lanczos_root(op, 5, generator=torch.Generator().manual_seed(0))
    assert evals.shape == (5,) and U.shape == (G.shape[0], 5)
    assert rel_err(evals, ref[:5]) <= 1e-8
    assert rel_err(G @ U, U * evals) <= 1e-6
    assert rel_err(U.T @ U, torch.eye(5, dtype=D64)) <= 1e-8
    # rank(G) ≤ n·(k−1) = 12 < 15: the extra eigenvalues are zero, the vectors still orthonormal
    evals, U = lanczos_root(op, 15, num_iter=40)
    assert rel_err(evals[:12], ref[:12]) <= 1e-6 and evals[12:].abs().max() <= 1e-8 * ref[0]
    assert rel_err(U.T @ U, torch.eye(15, dtype=D64)) <= 1e-8
    # the mean reduction (small scale) is found as well
    ev_mean, _ = lanczos_root(fntk.GGNOperator(lin, x, lik, reduction="mean"), 3)
    assert rel_err(ev_mean, ref[:3] / x.shape[0]) <= 1e-8


def test_hutchinson_diagonal():
    d = torch.rand(30, dtype=D64)
    assert rel_err(hutchinson_diagonal(torch.diag(d), 3), d) <= 1e-14  # exact for diagonal A
    model, x, lin, lik, y, G = setup("mlp", "gaussian")
    op = fntk.GGNOperator(lin, x, lik)
    est = hutchinson_diagonal(op, 2000, batch_size=500, generator=torch.Generator().manual_seed(0))
    assert rel_err(est, G.diagonal()) <= 0.15


def test_linear_operator_solve_and_added_diagonal():
    """The operator composes with linear_operator (a damped solve, as Laplace/Newton needs)."""
    model, x, lin, lik, y, G = setup("cnn", "categorical")
    op = fntk.GGNOperator(lin, x, lik)
    A = op.add_diagonal(torch.tensor(0.5, dtype=D64))
    b = torch.randn(G.shape[0], 2, dtype=D64)
    dense = G + 0.5 * torch.eye(G.shape[0], dtype=D64)
    ref = torch.linalg.solve(dense, b)
    assert rel_err(A.solve(b), ref) <= 1e-8  # small p: linear_operator's Cholesky on to_dense()
    with linear_operator.settings.max_cholesky_size(0), linear_operator.settings.cg_tolerance(1e-6):
        sol = A.solve(b)  # matrix-free CG
    assert rel_err(dense @ sol, b) <= 1e-4
    assert rel_err(A.to_dense(), dense) <= TOL


def test_errors():
    model, x, _ = make("multi")
    lin = fntk.Linearized(model)
    lik = L.Categorical()
    with pytest.raises(ValueError, match="method must be one of"):
        fntk.GGNOperator(lin, x, lik, method="kfac")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fntk.GGNOperator(lin, x, lik, reduction="avg")
    with pytest.raises(ValueError, match="eps must be a positive float"):
        fntk.GGNOperator(lin, x, lik, method="finite_difference", eps=0.0)
    with pytest.raises(TypeError, match="lin must be a fntk.Linearized"):
        fntk.GGNOperator(model, x, lik)
    with pytest.raises(TypeError, match="likelihood must be a fntk.likelihoods.Likelihood"):
        fntk.GGNOperator(lin, x, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"y has labels outside \[0, 3\)"):
        fntk.GGNOperator(lin, x, lik, y=torch.full((x.shape[0],), 5))
    with pytest.raises(ValueError, match="even number of outputs"):
        fntk.GGNOperator(lin, x, L.HeteroscedasticGaussian())
    gen = L.GenericLikelihood(lambda fi, yi: ((fi - yi) ** 2).sum())
    with pytest.raises(ValueError, match="y is required"):
        fntk.GGNOperator(lin, x, gen)
    with pytest.raises(ValueError, match="needs a likelihood with a KL divergence"):
        fntk.GGNOperator(lin, x, gen, y=torch.randn(x.shape[0], 3), method="autograd")
    op = fntk.GGNOperator(lin, x, lik)
    with pytest.raises(ValueError, match="rank must be an int"):
        lanczos_root(op, 0)
    with pytest.raises(ValueError, match="square"):
        hutchinson_diagonal(torch.zeros(3, 4), 2)


@pytest.mark.parametrize(
    "case,name", [("multi", "categorical"), ("cnn", "hetero_softplus"), ("mlp", "bernoulli")]
)
def test_hessian_at_given_logits(case, name):
    """logits= moves only where H is evaluated: G = Σ Jᵀ H(logits) J with J still at θ̂."""
    model, x, lin, lik, y, _ = setup(case, name)
    J = dense_jacobian(model, x)
    gen = torch.Generator().manual_seed(3)
    logits = lin.forward(x) + 0.5 * torch.randn(lin.forward(x).shape, generator=gen, dtype=D64)
    _, logp, _, _ = data(name, logits.shape[1], torch.Generator().manual_seed(7))
    G = torch.einsum("nkp,nkl,nlq->pq", J, fisher_reference(name, logp, logits, y), J)
    op = fntk.GGNOperator(lin, x, lik, y, logits=logits)
    V = torch.randn(G.shape[0], 4, generator=gen, dtype=D64)
    assert rel_err(op @ V, G @ V) <= TOL
    assert rel_err(op.diagonal(), G.diagonal()) <= TOL
    assert rel_err(op.to_dense(), G) <= TOL
    with pytest.raises(ValueError, match="logits= .* needs method='exact'"):
        fntk.GGNOperator(lin, x, lik, y, method="autograd", logits=logits)
    with pytest.raises(
        ValueError, match=r"logits must be a tensor of shape \(6, \d\) \(n, k\), got \(5, \d\)"
    ):
        fntk.GGNOperator(lin, x, lik, y, logits=logits[:5])
