"""Every public entry point on every architecture family of tests/zoo.py, against the dense float64
Jacobian of tests/reference.py (plain autograd on the model or its reference twin), or refused up
front with the expected message. Also: the probes catch a deliberately broken vmap rule, the
user's hooks never run, the model is never modified, and threads sharing a Linearized get the
single-threaded numbers."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import fntk
from fntk.curvature import ggn_diagonal
from fntk.likelihoods import Categorical
from fntk.linearize import engine
from fntk.linearize.tapped import TappedJacobian, tapped_layers
from zoo import EXPECT, REFUSED, WORKING, Selected, build, reference_model

from reference import assert_same_fingerprint, dense_jacobian, eval_forward, fingerprint, rel_err

F64 = torch.float64
TOL = 1e-10  # products, kernels, operators: float64 rounding
TOL_SOLVE = 1e-8  # GP and classifier predictions (a Cholesky / Newton solve in between)
NO_DOUBLE_BACKWARD = {"hardswish_se", "embedding_bag"}


pytestmark = pytest.mark.usefixtures("one_thread")


_SETUPS: dict = {}
_BEFORE: dict = {}


def setup(name: str):
    """(case, lin, J(x), J(xs)) for a working family; references computed once per module (and the
    model's fingerprint before fntk saw it, in _BEFORE)."""
    if name not in _SETUPS:
        case = build(name)
        _BEFORE[name] = fingerprint(case.model)
        lin = fntk.Linearized(case.model, output_fn=case.output_fn)
        lin.forward(case.x)  # the first call probes
        names = ["m." + n for n in lin.names]
        ref = reference_model(case)
        _SETUPS[name] = (case, lin, dense_jacobian(ref, case.x, names), dense_jacobian(ref, case.xs, names))
    return _SETUPS[name]


def ntk_of(J1, J2):
    K = torch.einsum("ikp,jlp->ikjl", J1, J2)
    return K[:, 0, :, 0] if K.shape[1] == 1 else K


#: the families whose every selected parameter has a layer rule, so the tapped products apply
TAPPED = {"resnet_bn", "hardswish_se", "checkpoint", "tuple_out", "dict_out", "model_output",
          "broken_vmap_rule"}


@pytest.mark.parametrize("name", WORKING)
def test_tapped_products_where_they_apply(name):
    """The tapped multi-column products (convolutions, BN, SE, Linear; the output selections; a
    broken vmap rule, caught by the probes) equal the dense Jacobian; every family with a parameter
    outside the layer rules (PReLU, RNNs, attention, embeddings, tied or parametrized weights,
    Linear subclasses) keeps the autodiff path."""
    case, lin, J, _ = setup(name)
    x = lin.check_input(case.x)
    an = tapped_layers(lin, x)
    assert (an is not None) == (name in TAPPED)
    if an is None:
        return
    tj = TappedJacobian(lin, x, an)
    n, k, p = J.shape
    g = torch.Generator().manual_seed(0)
    V = torch.randn(p, 3, generator=g, dtype=torch.float64)
    U = torch.randn(n, k, 3, generator=g, dtype=torch.float64)
    H = torch.randn(n, k, k, generator=g, dtype=torch.float64)
    dt = lin.dtype
    assert rel_err(tj.jvp(V.to(dt)).double(), torch.einsum("nkp,pr->nkr", J, V)) <= 1e-12
    assert rel_err(tj.vjp(U.to(dt)).double(), torch.einsum("nkp,nkr->pr", J, U)) <= 1e-12
    got = tj.ggn(V.to(dt), lambda u, s: torch.einsum("nkl,nlr->nkr", H[s].to(dt), u)).double()
    assert rel_err(got, torch.einsum("nkp,nkl,nlq,qr->pr", J, H, J, V)) <= 1e-12


# ---------------------------------------------------------------------------------- Linearized
@pytest.mark.parametrize("name", WORKING)
def test_linearized_maps(name):
    case, lin, J, _ = setup(name)
    x = case.x
    n, k, p = J.shape
    assert (lin.num_outputs, lin.num_params) == (k, p)
    assert rel_err(lin.forward(x), eval_forward(reference_model(case), x)) <= TOL
    g = torch.Generator().manual_seed(1)
    V = torch.randn(p, 3, generator=g, dtype=F64)
    U = torch.randn(n, k, 3, generator=g, dtype=F64)
    assert rel_err(lin.jvp(x, V), torch.einsum("nkp,pr->nkr", J, V)) <= TOL
    assert rel_err(lin.jvp(x, V[:, 0]), J @ V[:, 0]) <= TOL
    assert rel_err(lin.vjp(x, U), torch.einsum("nkp,nkr->pr", J, U)) <= TOL
    assert rel_err(lin.vjp(x, U[..., 0]), torch.einsum("nkp,nk->p", J, U[..., 0])) <= TOL
    assert rel_err(lin.jacobian(x), J) <= TOL
    w = lin.theta + 0.1 * V[:, 0]
    assert rel_err(lin(x, w), lin.forward(x) + 0.1 * J @ V[:, 0]) <= TOL
    caps = lin.capabilities
    for key, value in EXPECT.get(name, {}).items():
        assert getattr(caps, key) == value, (key, caps)
    assert caps.independent and caps.points >= 2
    assert_same_fingerprint(_BEFORE[name], fingerprint(case.model))


@pytest.mark.parametrize("name", WORKING)
def test_ntk_and_operators(name):
    case, lin, J, Js = setup(name)
    x, xs = case.x, case.xs
    K, Kx = ntk_of(J, J), ntk_of(J, Js)
    for method in ("structured", "contraction", "products", "auto"):
        assert rel_err(fntk.ntk(lin, x, method=method), K) <= TOL, method
        assert rel_err(fntk.ntk(lin, x, xs, method=method), Kx) <= TOL, method
    n, k, p = J.shape
    Kmat, Jmat = K.reshape(n * k, n * k), J.reshape(n * k, p)
    R = torch.randn(n * k, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    for dense in (True, False):
        op = fntk.NTKOperator(lin, x, dense=dense)
        assert rel_err(op @ R, Kmat @ R) <= TOL, dense
        assert rel_err(op.diagonal(), Kmat.diagonal()) <= TOL, dense
    c = k - 1  # one output's kernel, matrix-free
    op = fntk.NTKOperator(lin, x, xs, outputs=c, dense=False)
    assert rel_err(op @ R[: xs.shape[0]], J[:, c] @ Js[:, c].T @ R[: xs.shape[0]]) <= TOL
    jop = fntk.JacobianOperator(lin, x)
    v = torch.randn(p, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert rel_err(jop @ v, Jmat @ v) <= TOL
    assert rel_err(jop.mT @ R, Jmat.T @ R) <= TOL
    assert rel_err(jop.to_dense(), Jmat) <= TOL


@pytest.mark.parametrize("name", WORKING)
def test_ggn_products_and_diagonal(name):
    case, lin, J, _ = setup(name)
    x = case.x
    n, k, p = J.shape
    y = torch.arange(n) % k
    f = lin.forward(x)
    prob = torch.softmax(f, -1)
    H = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J)
    V = torch.randn(p, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    exact = fntk.GGNOperator(lin, x, Categorical(), y=y)
    assert rel_err(exact @ V, G @ V) <= TOL
    assert rel_err(exact.diagonal(), G.diagonal()) <= TOL
    assert rel_err(exact.to_dense(), G) <= TOL
    assert rel_err(ggn_diagonal(lin, x, Categorical(), y, structured=False), G.diagonal()) <= TOL
    # finite differences are O(ε) (the change of J and H along the step): ε = 1e-6 gives ~1e-6
    if name in ("tied_module", "tied_functional"):  # a step would move the padding row autograd freezes
        with pytest.raises(ValueError, match="padding rows.*method='exact'"):
            fntk.GGNOperator(lin, x, Categorical(), y=y, method="finite_difference")
    else:
        fd = fntk.GGNOperator(lin, x, Categorical(), y=y, method="finite_difference", eps=1e-6)
        assert rel_err(fd @ V, G @ V) <= 2e-5
    if name in NO_DOUBLE_BACKWARD:  # torch has no derivative of hardsigmoid's / embedding_bag's backward
        with pytest.raises(ValueError, match="no autodiff path for second derivatives.*method='exact'"):
            fntk.GGNOperator(lin, x, Categorical(), y=y, method="autograd")
        assert lin.capabilities.hvp == "unavailable"
    else:
        auto = fntk.GGNOperator(lin, x, Categorical(), y=y, method="autograd")
        assert rel_err(auto @ V, G @ V) <= TOL


@pytest.mark.parametrize("name", ["lstm", "prelu_mlp", "transformer_text", "param_norms"])
def test_float32_models_take_their_own_paths(name):
    """float32 takes other kernels (an LSTM runs mkldnn: no forward mode, unlike float64), which the
    probes find on their own; results agree with the float64 reference to float32 precision, also
    inside torch.no_grad() (where mkldnn would save no workspace for a backward)."""
    case, _, J, _ = setup(name)
    m32 = build(name).model.float()
    x = case.x.float() if case.x.is_floating_point() else case.x
    lin = fntk.Linearized(m32, output_fn=case.output_fn)
    with torch.no_grad():
        assert rel_err(lin.jacobian(x).double(), J) <= 1e-5
        assert rel_err(fntk.ntk(lin, x).double(), ntk_of(J, J)) <= 1e-5
    V = torch.randn(lin.num_params, 2)
    assert rel_err(lin.jvp(x, V).double(), torch.einsum("nkp,pr->nkr", J, V.double())) <= 1e-5
    if name == "lstm":
        assert lin.capabilities.jvp == "double_vjp" and "mkldnn" in lin.capabilities.rejected["jvp:forward"]


def test_with_dtype_copies_the_linearization():
    """A float32 (or float16 → float32) working copy keeps the selection and the output selection,
    also for hook-based weight norm after use (its module then holds a non-leaf weight, which a
    plain deepcopy refuses)."""
    for name in ("hook_norms", "tuple_out"):
        case, lin, J, _ = setup(name)
        lin.jacobian(case.x)
        lo = lin.with_dtype(torch.float32)
        assert lo.dtype == torch.float32 and lo.names == lin.names and lo.output_fn is lin.output_fn
        assert rel_err(lo.jacobian(case.x.float()).double(), J) <= 1e-5


# ---------------------------------------------------------------------------------- estimators
def reference_gp(J, Js, f, fs, y, s, noise, b):
    """Exact GP posterior mean and variance of output 0 from explicit Jacobians."""
    J0, Js0 = J[:, 0], Js[:, 0]
    L = torch.linalg.cholesky(s * J0 @ J0.T + noise * torch.eye(J0.shape[0], dtype=F64))
    alpha = torch.cholesky_solve((y - f[:, 0] - b)[:, None], L)[:, 0]
    W = torch.linalg.solve_triangular(L, s * J0 @ Js0.T, upper=False)
    return fs[:, 0] + b + s * Js0 @ J0.T @ alpha, s * (Js0 * Js0).sum(1) - (W * W).sum(0)


@pytest.mark.parametrize("name", WORKING)
def test_regressor(name):
    case, lin, J, Js = setup(name)
    f, fs = lin.forward(case.x), lin.forward(case.xs)
    y = torch.linspace(-1, 1, case.x.shape[0], dtype=F64)
    s, noise, b = 0.7, 0.05, 0.3
    mean, var = reference_gp(J, Js, f, fs, y, s, noise, b)
    for space in ("function", "weight"):
        reg = fntk.NTKRegressor(lin, space=space, solver="direct", noise=noise, scale=s, constant=b,
                                optimize=False).fit(case.x, y)
        post = reg.predict(case.xs)
        assert rel_err(post.mean, mean) <= TOL_SOLVE, space
        assert rel_err(post.variance, var) <= TOL_SOLVE, space


@pytest.mark.parametrize("name", WORKING)
def test_classifier(name):
    case, lin, J, Js = setup(name)
    n, k, p = J.shape
    y = torch.arange(n) % k
    lam = 1.0
    f0, f0s, theta = lin.forward(case.x), lin.forward(case.xs), lin.theta
    w = theta.clone()
    for _ in range(60):  # dense Newton on the linearized MAP problem (strictly convex)
        logits = f0 + J @ (w - theta)
        prob = torch.softmax(logits, -1)
        grad = torch.einsum("nkp,nk->p", J, prob - nn.functional.one_hot(y, k).to(F64)) + lam * (w - theta)
        H = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        P = torch.einsum("nkp,nkl,nlq->pq", J, H, J) + lam * torch.eye(p, dtype=F64)
        if grad.norm() < 1e-13:
            break
        w = w - torch.linalg.solve(P, grad)
    mean = f0s + Js @ (w - theta)
    cov = torch.einsum("nkp,pq,nlq->nkl", Js, torch.linalg.inv(P), Js)
    clf = fntk.LinearizedClassifier(lin, inference="laplace", prior_precision=lam, tol=1e-12).fit(case.x, y)
    m, c = clf.predict_f(case.xs)
    assert rel_err(m, mean) <= TOL_SOLVE and rel_err(c, cov) <= TOL_SOLVE
    probit = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * cov.diagonal(dim1=1, dim2=2)), -1)
    assert rel_err(clf.predict_proba(case.xs), probit) <= TOL_SOLVE
    assert_same_fingerprint(_BEFORE[name], fingerprint(case.model))  # after every entry point


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_up_front(name):
    case = build(name)
    fp = fingerprint(case.model)
    with pytest.raises((ValueError, TypeError), match=REFUSED[name]):
        lin = fntk.Linearized(case.model, output_fn=case.output_fn)
        fntk.ntk(lin, case.x)
    assert_same_fingerprint(fp, fingerprint(case.model))


def test_refused_weights_and_inputs():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    with torch.no_grad():
        model[2].weight[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"parameter '2.weight' contains NaN or Inf \(1 of 8"):
        fntk.Linearized(model)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(F64)
    bn[1].running_var[2] = math.inf
    with pytest.raises(ValueError, match="buffer '1.running_var' contains NaN or Inf"):
        fntk.Linearized(bn)
    emb = nn.Sequential(nn.Embedding(5, 2, max_norm=1.0), nn.Flatten(), nn.Linear(4, 1)).to(F64)
    with pytest.raises(ValueError, match="max_norm=1.0: it renormalises its weight in place"):
        fntk.Linearized(emb)
    lin = fntk.Linearized(nn.Linear(3, 2).to(F64))
    with pytest.raises(TypeError, match="x is complex.*real inputs"):
        lin.forward(torch.randn(4, 3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="output_fn must be a callable"):
        fntk.Linearized(nn.Linear(3, 2), output_fn="logits")
    one = fntk.Linearized(nn.Linear(1, 1).to(F64))
    with pytest.raises(ValueError, match=r"x is 1-d.*pass x\[:, None\] \(shape \(6, 1\)\)"):
        one.forward(torch.randn(6, dtype=F64))
    col = torch.randn(6, 1, dtype=F64)  # the refusal left no state behind: (n, 1) works
    assert rel_err(one.jacobian(col), dense_jacobian(one.module, col, ["weight", "bias"])) <= TOL
    wrapped = fntk.Linearized(nn.Linear(3, 2).to(F64), output_fn=lambda out: (out,))
    with pytest.raises(TypeError, match="output_fn must return a Tensor"):
        wrapped.forward(torch.randn(4, 3, dtype=F64))


def test_materialisations_are_checked_before_allocating():
    lin = fntk.Linearized(nn.Linear(3, 2).to(F64), memory_budget=100)
    x = torch.randn(50, 3, dtype=F64)
    with pytest.raises(fntk.NTKMemoryError, match=r"Jacobian of shape \(50, 2, 8\).*memory_budget"):
        lin.jacobian(x)
    with pytest.raises(fntk.NTKMemoryError, match=r"Jacobian of shape \(50, 2, 8\)"):
        fntk.JacobianOperator(lin, x).to_dense()


def test_operator_refuses_wrong_shapes():
    case, lin, J, _ = setup("prelu_mlp")
    n, k, p = J.shape
    for op, good in ((fntk.NTKOperator(lin, case.x), n * k), (fntk.JacobianOperator(lin, case.x), p)):
        msg = rf"of shape .* multiplies a vector \({good},\).*got .*\({good + 1},\)"
        with pytest.raises(ValueError, match=msg):
            op @ torch.ones(good + 1, dtype=F64)
    G = fntk.GGNOperator(lin, case.x, Categorical(), y=torch.arange(n) % k)
    with pytest.raises(ValueError, match=rf"\(\.\.\., {p}, r\), got a tensor of shape \(3, 2\)"):
        G @ torch.ones(3, 2, dtype=F64)


# ---------------------------------------------------------------------------------- the probes
def test_probe_catches_a_broken_vmap_rule():
    """BadBatchSquare's vmap rule is wrong by 25%: nested vmap over points (what jacobian would use)
    gives wrong rows, the probe rejects it, and every entry point is right."""
    case, lin, J, _ = setup("broken_vmap_rule")
    rows = engine.per_example_jacobian(lin.module, lin.fixed_dict(), lin.theta_dict(), lin.names,
                                       lin.num_outputs, mode="nested_vmap")(case.x)
    assert rel_err(rows, J) > 0.05  # the broken rule, were it trusted
    caps = lin.capabilities
    assert caps.rows == "cotangent_vmap" and "disagrees" in caps.rejected["rows:nested_vmap"]
    assert caps.jvp == "forward"  # tangents batched over a fixed primal: the rule is not used
    assert rel_err(lin.jacobian(case.x), J) <= TOL


def test_capabilities_report_and_cost():
    case, lin, _, _ = setup("lstm")
    caps = lin.capabilities
    assert caps.rows == "cotangent_vmap" and "RuntimeError" in caps.rejected["rows:nested_vmap"]
    assert caps.seconds > 0 and 1 <= caps.units < 200  # a few passes (python overhead on tiny nets)
    assert lin.slowdown("rows") > 1 and lin.slowdown("jvp") == 1
    with pytest.raises(RuntimeError, match="call forward"):
        _ = fntk.Linearized(case.model).capabilities


def test_private_copy_has_no_user_hooks_and_global_state_is_restored():
    case = build("mha_fast_path")
    calls = []
    case.model.att.register_forward_hook(lambda m, i, o: calls.append(1))
    case.model.register_forward_pre_hook(lambda m, i: calls.append(2))
    lin = fntk.Linearized(case.model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lin.module.modules())
    lin.jacobian(case.x)
    fntk.ntk(lin, case.x, method="structured")
    assert calls == []
    assert torch.backends.mha.get_fastpath_enabled()  # restored after every call
    with pytest.raises(ValueError):
        lin.jvp(case.x, torch.ones(lin.num_params + 1, dtype=F64))
    assert torch.backends.mha.get_fastpath_enabled()
    case.model(case.x)
    assert calls == [2, 1]  # the user's model keeps its hooks


def test_threads_share_one_linearized():
    """Concurrent jvp, vjp, Jacobians and structured NTKs (which put hooks on the private copy) on
    one Linearized, and on a second one at the same time, equal the single-threaded results."""
    case, lin, J, _ = setup("resnet_bn")
    other_case, other, J2, _ = setup("transformer_text")
    V = torch.randn(lin.num_params, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    jobs = {
        "jvp": lambda: lin.jvp(case.x, V),
        "jac": lambda: lin.jacobian(case.x),
        "ntk": lambda: fntk.ntk(lin, case.x, method="structured"),
        "ntk2": lambda: fntk.ntk(other, other_case.x, method="structured"),
        "vjp2": lambda: other.vjp(other_case.x, torch.ones(len(other_case.x), other.num_outputs, dtype=F64)),
    }
    want = {key: job() for key, job in jobs.items()}
    got: dict = {}
    errors: list = []

    def worker(key):
        try:
            for _ in range(3):
                got.setdefault(key, []).append(jobs[key]())
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(key,)) for key in jobs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for key, outs in got.items():
        assert len(outs) == 6 and all(rel_err(o, want[key]) <= TOL for o in outs), key
    assert torch.backends.mha.get_fastpath_enabled()


def test_readme_supported_models_example_runs():
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Supported models\n.*?```python\n(.*?)```", text, re.S)
    ns: dict = {}
    exec(compile(block.group(1), "README Supported models", "exec"), ns)
    lin, x = ns["lin"], ns["x"]
    assert ns["K"].shape == (20, 4, 20, 4)
    assert ns["caps"].jvp == "double_vjp" and "mkldnn" in ns["caps"].rejected["jvp:forward"]  # float32 LSTM
    J = dense_jacobian(Selected(ns["rnn"], lin.output_fn), x, ["m." + n for n in lin.names]).double()
    assert rel_err(ns["K"].double(), torch.einsum("ikp,jlp->ikjl", J, J)) <= 1e-5
