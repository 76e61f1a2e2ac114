"""Linearized against the dense float64 autograd reference (relative error <= 1e-10)."""

import pytest
import torch

import fntk

from models import CASES, make
from reference import assert_same_fingerprint, dense_jacobian, eval_forward, fingerprint, rel_err

TOL = 1e-10


def selections(name, model):
    """(label, params argument, names) triples: all parameters and a last-layer subset."""
    names = [n for n, _ in model.named_parameters()]
    last = [n for n in names if n.startswith(names[-1].rsplit(".", 1)[0] + ".")]
    return [("all", None, names), ("last", last, last)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sel", ["all", "last"])
def test_products_match_dense(case, sel):
    model, x, _ = make(case)
    label, params, names = dict((s[0], s) for s in selections(case, model))[sel]
    fp = fingerprint(model)
    lin = fntk.Linearized(model, params=params)
    J = dense_jacobian(model, x, names)  # (n, k, p)
    n, k, p = J.shape
    assert lin.num_params == p
    assert rel_err(lin.forward(x), eval_forward(model, x)) <= TOL
    assert lin.num_outputs == k
    assert rel_err(lin.jacobian(x), J) <= TOL
    g = torch.Generator().manual_seed(1)
    for r in (1, 7):
        V = torch.randn(p, r, generator=g, dtype=torch.float64)
        U = torch.randn(n, k, r, generator=g, dtype=torch.float64)
        assert rel_err(lin.jvp(x, V), torch.einsum("nkp,pr->nkr", J, V)) <= TOL
        assert rel_err(lin.vjp(x, U), torch.einsum("nkp,nkr->pr", J, U)) <= TOL
    v, u = V[:, 0], U[..., 0]
    assert rel_err(lin.jvp(x, v), J @ v) <= TOL
    assert rel_err(lin.vjp(x, u), torch.einsum("nkp,nk->p", J, u)) <= TOL
    w = lin.theta + 0.1 * v
    assert rel_err(lin(x, w), eval_forward(model, x) + J @ (0.1 * v)) <= TOL
    assert_same_fingerprint(fp, fingerprint(model))


def test_squeezed_single_output_shapes():
    model, x, _ = make("mlp")
    lin = fntk.Linearized(model)
    J = dense_jacobian(model, x)[:, 0]
    u = torch.randn(x.shape[0], dtype=torch.float64)
    assert rel_err(lin.vjp(x, u), J.T @ u) <= TOL
    U = torch.randn(x.shape[0], 3, dtype=torch.float64)
    assert rel_err(lin.vjp(x, U), J.T @ U) <= TOL


def test_chunking_gives_same_answer():
    model, x, _ = make("cnn")
    big = fntk.Linearized(model)
    tiny = fntk.Linearized(model, memory_budget=1)  # one point per chunk
    V = torch.randn(big.num_params, 4, dtype=torch.float64)
    assert rel_err(tiny.jvp(x, V), big.jvp(x, V)) <= TOL
    U = torch.randn(x.shape[0], 2, 4, dtype=torch.float64)
    assert rel_err(tiny.vjp(x, U), big.vjp(x, U)) <= TOL
    J = big.jacobian(x)
    with pytest.raises(fntk.NTKMemoryError, match="GiB.*memory_budget"):  # the result alone does not fit
        tiny.jacobian(x)
    exact = fntk.Linearized(model, memory_budget=J.numel() * 8)  # the result fits, in several chunks
    exact.forward(x)
    assert exact.rows_per_chunk(2, extra_per_row=4 * big.num_params) < x.shape[0]
    assert rel_err(exact.jacobian(x), J) <= TOL


def test_train_mode_model_uses_eval_semantics_and_stays_in_train_mode():
    model, x, _ = make("cnn")
    model.train()
    fp = fingerprint(model)
    lin = fntk.Linearized(model)
    out = lin.forward(x)
    assert rel_err(out, eval_forward(model, x)) <= TOL
    assert model.training and model.bn.training
    assert_same_fingerprint(fp, fingerprint(model))


def test_float32_close_to_float64():
    model, x, _ = make("mlp")
    lin64 = fntk.Linearized(model)
    lin32 = fntk.Linearized(model.float())
    v = torch.randn(lin64.num_params, dtype=torch.float64)
    out32 = lin32.jvp(x.float(), v.float())
    assert out32.dtype == torch.float32
    assert rel_err(out32.double(), lin64.jvp(x, v)) <= 1e-5


def test_predicate_selection_and_theta_is_copy():
    model, x, _ = make("mlp")
    lin = fntk.Linearized(model, params=lambda name, p: name.endswith("bias"))
    assert lin.names == [n for n, _ in model.named_parameters() if n.endswith("bias")]
    th = lin.theta
    th.add_(1.0)
    assert not torch.equal(th, lin.theta)


def test_trailing_output_shape_flattened():
    class Out2D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 6)

        def forward(self, x):
            return self.fc(x).reshape(-1, 2, 3)

    model = Out2D().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    lin = fntk.Linearized(model)
    assert lin.forward(x).shape == (4, 6)
    assert rel_err(lin.jacobian(x), dense_jacobian(model, x)) <= TOL


@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        (lambda lin, x: lin.forward(x[:, :2]), ValueError, "does not fit the model"),
        (lambda lin, x: lin.jvp(x, torch.zeros(3, dtype=torch.float64)), ValueError, "v must have shape"),
        (lambda lin, x: lin.vjp(x, torch.zeros(2, 1, dtype=torch.float64)), ValueError, "u must have shape"),
        (lambda lin, x: lin.forward(x.long()), TypeError, "floating-point"),
        (lambda lin, x: lin.forward(x[:0]), ValueError, "empty"),
        (lambda lin, x: lin(x, torch.zeros(2)), ValueError, "w must have shape"),
    ],
)
def test_clear_errors_and_model_untouched(call, exc, fragment):
    model, x, _ = make("mlp")
    fp = fingerprint(model)
    lin = fntk.Linearized(model)
    with pytest.raises(exc, match=fragment):
        call(lin, x)
    assert_same_fingerprint(fp, fingerprint(model))


def test_feature_shape_remembered():
    model, x, _ = make("mlp")
    lin = fntk.Linearized(model)
    lin.forward(x)
    with pytest.raises(ValueError, match=r"feature shape \(4,\)"):
        lin.forward(torch.randn(2, 4, dtype=torch.float64))


def test_selection_errors():
    model, _, _ = make("mlp")
    with pytest.raises(ValueError, match="selection is empty"):
        fntk.Linearized(model, params=[])
    with pytest.raises(ValueError, match="unknown parameter"):
        fntk.Linearized(model, params=["nope.weight"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fntk.Linearized(lambda x: x)


def test_num_outputs_before_forward_is_clear():
    model, _, _ = make("mlp")
    with pytest.raises(RuntimeError, match="first forward"):
        _ = fntk.Linearized(model).num_outputs
