"""JacobianOperator and NTKOperator against dense float64 J(x1) J(x2)ᵀ."""

import linear_operator
import pytest
import torch

import fntk

from models import CASES, make
from reference import assert_same_fingerprint, dense_jacobian, fingerprint, rel_err

TOL = 1e-10


@pytest.mark.parametrize("dense", [False, True, None])
@pytest.mark.parametrize("case", CASES)
def test_ntk_operator_matmul_diag_dense(case, dense):
    model, x1, x2 = make(case)
    fp = fingerprint(model)
    lin = fntk.Linearized(model)
    J1, J2 = dense_jacobian(model, x1), dense_jacobian(model, x2)
    n1, k, p = J1.shape
    J1f, J2f = J1.reshape(n1 * k, p), J2.reshape(-1, p)
    K11, K12 = J1f @ J1f.T, J1f @ J2f.T
    op = fntk.NTKOperator(lin, x1, dense=dense)
    op12 = fntk.NTKOperator(lin, x1, x2, dense=dense)
    assert op.shape == (n1 * k, n1 * k) and op12.shape == (n1 * k, J2f.shape[0])
    for r in (1, 7):
        V = torch.randn(n1 * k, r, dtype=torch.float64)
        W = torch.randn(J2f.shape[0], r, dtype=torch.float64)
        assert rel_err(op @ V, K11 @ V) <= TOL
        assert rel_err(op12 @ W, K12 @ W) <= TOL
        assert rel_err(op12.mT @ V, K12.T @ V) <= TOL
    assert rel_err(op.diagonal(), K11.diagonal()) <= TOL
    assert (op._dense is not None) == (dense is not False)  # auto densifies these small kernels
    assert rel_err(op.to_dense(), K11) <= TOL
    assert rel_err(op12.to_dense(), K12) <= TOL
    # batched right-hand sides (*b, N, r) as linear_operator passes them
    B = torch.randn(2, n1 * k, 3, dtype=torch.float64)
    assert rel_err(op.matmul(B), K11 @ B) <= TOL
    assert_same_fingerprint(fp, fingerprint(model))


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("case", ["multi", "cnn"])
def test_ntk_operator_single_output(case, dense):
    model, x1, x2 = make(case)
    lin = fntk.Linearized(model)
    J1, J2 = dense_jacobian(model, x1)[:, 1], dense_jacobian(model, x2)[:, 1]
    op = fntk.NTKOperator(lin, x1, x2, outputs=1, dense=dense)
    V = torch.randn(x2.shape[0], 4, dtype=torch.float64)
    assert rel_err(op @ V, J1 @ J2.T @ V) <= TOL
    sym = fntk.NTKOperator(lin, x1, outputs=-1, dense=dense)
    Jl = dense_jacobian(model, x1)[:, -1]
    assert rel_err(sym.diagonal(), (Jl**2).sum(-1)) <= TOL
    assert rel_err(sym.to_dense(), Jl @ Jl.T) <= TOL


def test_ntk_operator_indexing():
    model, x1, x2 = make("mlp")
    lin = fntk.Linearized(model)
    J = dense_jacobian(model, torch.cat([x1, x2]))[:, 0]
    K = J @ J.T
    op = fntk.NTKOperator(lin, torch.cat([x1, x2]))
    n = x1.shape[0]
    assert rel_err(op[:n, :n].to_dense(), K[:n, :n]) <= TOL
    assert rel_err(op[n:, :n].to_dense(), K[n:, :n]) <= TOL
    idx = torch.tensor([0, 3, 5])
    assert rel_err(op[idx, idx], K[idx, idx]) <= TOL
    assert rel_err(op[2, 4], K[2, 4]) <= TOL


def test_cg_solve_through_linear_operator():
    model, x1, _ = make("mlp")
    lin = fntk.Linearized(model)
    J = dense_jacobian(model, x1)[:, 0]
    A = fntk.NTKOperator(lin, x1).add_diagonal(torch.tensor(0.5, dtype=torch.float64))
    b = torch.randn(x1.shape[0], 2, dtype=torch.float64)
    ref = torch.linalg.solve(J @ J.T + 0.5 * torch.eye(x1.shape[0], dtype=torch.float64), b)
    with linear_operator.settings.max_cholesky_size(0), linear_operator.settings.cg_tolerance(1e-12):
        sol = A.solve(b)
    assert rel_err(sol, ref) <= 1e-6


@pytest.mark.parametrize("case", ["mlp", "multi", "tied"])
def test_jacobian_operator(case):
    model, x, _ = make(case)
    lin = fntk.Linearized(model)
    J = dense_jacobian(model, x)
    Jf = J.reshape(-1, J.shape[-1])
    op = fntk.JacobianOperator(lin, x)
    V = torch.randn(Jf.shape[1], 7, dtype=torch.float64)
    U = torch.randn(Jf.shape[0], 7, dtype=torch.float64)
    assert op.shape == Jf.shape
    assert rel_err(op @ V, Jf @ V) <= TOL
    assert rel_err(op.mT @ U, Jf.T @ U) <= TOL
    assert rel_err(op.to_dense(), Jf) <= TOL
    assert rel_err(op.mT.to_dense(), Jf.T) <= TOL


def test_operator_errors():
    model, x1, _ = make("multi")
    lin = fntk.Linearized(model)
    with pytest.raises(ValueError, match="out of range"):
        fntk.NTKOperator(lin, x1, outputs=3)
    with pytest.raises(ValueError, match="x2 .* does not fit|x2 has feature shape"):
        fntk.NTKOperator(lin, x1, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="fntk.Linearized"):
        fntk.NTKOperator(model, x1)
