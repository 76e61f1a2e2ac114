"""Every entry point that takes inputs accepts a DataLoader (or any re-iterable of batches) and
gives the tensor path's results to 1e-10 in float64, and the dense float64 references of
tests/reference.py where one exists; refusals name the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fntk
from fntk.errors import NTKMemoryError
from fntk.likelihoods import Categorical, Gaussian
from fntk.operators import ggn_dense, ggn_diagonal

from reference import dense_jacobian, rel_err

F64 = torch.float64
TOL = 1e-10


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 3)).to(F64)
    x = torch.randn(23, 1, 8, dtype=F64)
    y = torch.randint(0, 3, (23,))
    loader = DataLoader(TensorDataset(x, y), batch_size=7)  # batches of 7, 7, 7, 2
    return net, fntk.Linearized(net), x, y, loader


def test_linearized_maps(data):
    net, lin, x, _, loader = data
    J = dense_jacobian(net, x)
    V = torch.randn(lin.num_params, 3, dtype=F64)
    U = torch.randn(23, 3, 3, dtype=F64)
    w = lin.theta + 0.1 * V[:, 0]
    pairs = [
        (lin.forward(loader), lin.forward(x), None),
        (lin.jacobian(loader), lin.jacobian(x), J),
        (lin.jvp(loader, V), lin.jvp(x, V), torch.einsum("nkp,pr->nkr", J, V)),
        (lin.jvp(loader, V[:, 0]), lin.jvp(x, V[:, 0]), J @ V[:, 0]),
        (lin.vjp(loader, U), lin.vjp(x, U), torch.einsum("nkp,nkr->pr", J, U)),
        (lin.vjp(loader, U[..., 0]), lin.vjp(x, U[..., 0]), None),
        (lin(loader, w), lin(x, w), lin.forward(x) + J @ (w - lin.theta)),
    ]
    for got, tensor_path, ref in pairs:
        assert got.shape == tensor_path.shape and rel_err(got, tensor_path) <= TOL
        if ref is not None:
            assert rel_err(got, ref) <= TOL
    # a plain list of tensors works as well
    assert rel_err(lin.forward([x[:10], x[10:]]), lin.forward(x)) <= TOL


def test_kernels_and_operators(data):
    net, lin, x, _, loader = data
    J = dense_jacobian(net, x)
    Jm = J.reshape(-1, lin.num_params)
    K = fntk.ntk(lin, loader)
    assert rel_err(K, fntk.ntk(lin, x)) <= TOL and rel_err(K, torch.einsum("ikp,jlp->ikjl", J, J)) <= TOL
    assert rel_err(fntk.ntk(lin, loader, x[:5], outputs=1), J[:, 1] @ J[:5, 1].T) <= TOL
    V, U = torch.randn(lin.num_params, 2, dtype=F64), torch.randn(23 * 3, 2, dtype=F64)
    Jop = fntk.JacobianOperator(lin, loader)  # streams its batches
    assert Jop.shape == (69, lin.num_params) and isinstance(Jop.x, fntk.inputs.Stream)
    assert rel_err(Jop @ V, Jm @ V) <= TOL and rel_err(Jop.mT @ U, Jm.T @ U) <= TOL
    assert rel_err(Jop.mT.mT @ V[:, 0], Jm @ V[:, 0]) <= TOL and rel_err(Jop.to_dense(), Jm) <= TOL
    assert rel_err(Jop.mT.to_dense(), Jm.T) <= TOL
    Kop = fntk.NTKOperator(lin, loader, dense=False)
    assert rel_err(Kop @ U, Jm @ (Jm.T @ U)) <= TOL


@pytest.mark.parametrize("method", ["exact", "finite_difference", "autograd"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ggn_streams_over_batches(data, method, reduction):
    net, lin, x, _, loader = data
    J = dense_jacobian(net, x)
    P = torch.softmax(lin.forward(x), -1)
    H = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J) / (23 if reduction == "mean" else 1)
    V = torch.randn(lin.num_params, 4, dtype=F64)
    lik = Categorical()
    g_tensor = fntk.GGNOperator(lin, x, lik, method=method, reduction=reduction)
    g_loader = fntk.GGNOperator(lin, loader, lik, method=method, reduction=reduction)
    assert rel_err(g_loader @ V, g_tensor @ V) <= TOL
    assert rel_err(g_loader @ V[:, 0], g_tensor @ V[:, 0]) <= TOL
    assert rel_err(g_loader @ V, G @ V) <= (1e-3 if method == "finite_difference" else TOL)  # O(eps)
    assert rel_err(g_loader.diagonal(), G.diagonal()) <= TOL
    assert rel_err(g_loader.to_dense(), G) <= TOL


def test_ggn_diagonal_and_dense_functions(data):
    net, lin, x, _, loader = data
    lik = Gaussian()
    J = dense_jacobian(net, x)
    G = torch.einsum("nkp,nkq->pq", J, J)
    for structured in (True, False):
        d = ggn_diagonal(lin, loader, lik, structured=structured)
        assert rel_err(d, ggn_diagonal(lin, x, lik, structured=structured)) <= TOL
        assert rel_err(d, G.diagonal()) <= TOL
    assert rel_err(ggn_dense(lin, loader, lik, reduction="mean"), G / 23) <= TOL
    # logits= (where H is taken) with a loader
    f = lin.forward(x) + 0.3
    a = fntk.GGNOperator(lin, loader, Categorical(), logits=f)
    b = fntk.GGNOperator(lin, x, Categorical(), logits=f)
    V = torch.randn(lin.num_params, 2, dtype=F64)
    assert rel_err(a @ V, b @ V) <= TOL


def test_regressor_fit_and_predict(data, capsys):
    net, _, x, _, _ = data
    y = torch.sin(x[:, 0, :3].sum(1))
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    a = fntk.NTKRegressor(net, output=0).fit(x, y)
    b = fntk.NTKRegressor(net, output=0).fit(loader)
    assert b.model_ == a.model_ and rel_err(torch.tensor(b.noise_), torch.tensor(a.noise_)) <= TOL
    for test in (DataLoader(TensorDataset(x[:11]), batch_size=4), [x[:5], x[5:11]]):
        pa, pb = a.predict(x[:11]), b.predict(test)
        assert rel_err(pb.mean, pa.mean) <= TOL and rel_err(pb.variance, pa.variance) <= TOL
        assert rel_err(pb.predictive_variance, pa.predictive_variance) <= TOL
        assert rel_err(pb.covariance_matrix, pa.covariance_matrix) <= TOL
    bar = fntk.NTKRegressor(net, output=0, optimize=False, noise=0.1, progress=True).fit(x, y)
    assert rel_err(bar.predict(DataLoader(TensorDataset(x), batch_size=8)).mean, bar.predict(x).mean) <= TOL
    multi = fntk.NTKRegressor(net, output=None, optimize=False, noise=0.1)
    Y = torch.stack([y, -y, 2 * y], 1)
    assert "NTKRegressor.predict" in capsys.readouterr().err  # the bar over the 3 batches
    multi.fit(DataLoader(TensorDataset(x, Y), batch_size=5))
    ref = fntk.NTKRegressor(net, output=None, optimize=False, noise=0.1).fit(x, Y)
    assert rel_err(multi.predict([x[:4], x[4:9]]).mean, ref.predict(x[:9]).mean) <= TOL


@pytest.mark.parametrize("inference", ["map", "laplace"])
def test_classifier_fit_and_predict(data, inference, capsys):
    net, _, x, y, loader = data
    a = fntk.LinearizedClassifier(net, inference=inference, prior_precision=2.0).fit(x, y)
    b = fntk.LinearizedClassifier(net, inference=inference, prior_precision=2.0, progress=True).fit(loader)
    assert rel_err(b.weights(), a.weights()) <= TOL
    capsys.readouterr()
    assert rel_err(b.predict_proba(loader), a.predict_proba(x)) <= TOL
    assert "LinearizedClassifier.predict" in capsys.readouterr().err  # the bar over the 4 batches
    assert torch.equal(b.predict(loader), a.predict(x))
    mean, cov = b.predict_f(loader)
    ma, ca = a.predict_f(x)
    assert rel_err(mean, ma) <= TOL and (cov is None) == (ca is None)
    assert cov is None or rel_err(cov, ca) <= TOL


def test_evidence_fit_from_a_loader(data):
    net, _, x, y, loader = data
    a = fntk.LinearizedClassifier(net, inference="laplace").fit(x, y)
    b = fntk.LinearizedClassifier(net, inference="laplace").fit(loader)
    assert abs(a.prior_precision_ - b.prior_precision_) <= 1e-8 * a.prior_precision_


def test_loader_refusals(data):
    net, lin, x, y, _ = data
    with pytest.raises(ValueError, match="x is an empty loader"):
        lin.forward([])
    with pytest.raises(ValueError, match=r"batch 2 of x is a tensor \(3, 1, 7\) float64 but batch 0 was a "
                                         r"tensor \(b, 1, 8\) float64"):
        lin.jvp([x[:3], x[3:6], torch.randn(3, 1, 7, dtype=F64)], lin.theta)
    with pytest.raises(ValueError, match=r"u has 20 rows but x yields more points \(23 up to this batch\)"):
        lin.vjp([x[:10], x[10:]], torch.randn(20, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"u has 30 rows but x yields 23 points"):
        lin.vjp([x[:10], x[10:]], torch.randn(30, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"batch 1 of x contains NaN or Inf \(first at index 0\)"):
        lin.forward([x[:2], torch.full((2, 1, 8), float("nan"), dtype=F64)])
    with pytest.raises(ValueError, match=r"batch 1 of x: the inputs have 3 rows but the targets have 2 rows"):
        fntk.LinearizedClassifier(net, prior_precision=1.0).fit([(x[:3], y[:3]), (x[3:6], y[3:5])])
    with pytest.raises(ValueError, match=r"batch 0 of x has no targets"):
        fntk.NTKRegressor(net, output=0).fit([x[:3]])
    with pytest.raises(TypeError, match="one-shot iterator"):
        fntk.GGNOperator(lin, iter([x]), Categorical())
    small = fntk.Linearized(net, memory_budget=23 * 3 * lin.num_params * 8 - 1)
    with pytest.raises(NTKMemoryError, match=r"Jacobian of shape \(23, 3,"):
        small.jacobian(DataLoader(TensorDataset(x), batch_size=7))


def test_ggn_of_a_loader_takes_the_tapped_products_batch_by_batch():
    """Networks of Linear layers: the tapped GEMM products, their taps recomputed per batch (never
    kept for a loader), equal the tensor path and the dense reference."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 40), nn.Tanh(), nn.Linear(40, 4)).to(F64)
    lin = fntk.Linearized(net)
    x = torch.randn(60, 3, dtype=F64)
    J = dense_jacobian(net, x)
    P = torch.softmax(lin.forward(x), -1)
    G = torch.einsum("nkp,nkl,nlq->pq", J, torch.diag_embed(P) - P[:, :, None] * P[:, None, :], J)
    V = torch.randn(lin.num_params, 16, dtype=F64)
    a = fntk.GGNOperator(lin, x, "categorical")
    b = fntk.GGNOperator(lin, DataLoader(TensorDataset(x), batch_size=25), "categorical")
    assert rel_err(b @ V, a @ V) <= TOL and rel_err(b @ V, G @ V) <= TOL
    assert b._tapped(16) is not None and not b._taps["tj"].cached()
