"""Models whose forward takes a dict batch (Hugging Face style, ``model(**batch)``): every entry point
of fntk against the dense float64 Jacobian of plain autograd (tests/reference.py), on the tiny text
transformer of tests/zoo.py built from its config; integer entries pass through unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fntk
from fntk.likelihoods import Categorical
from fntk.operators import ggn_diagonal
from zoo import DictTextClassifier, TextConfig, text_batch

from reference import dense_jacobian, rel_err

F64 = torch.float64
TOL = 1e-10


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = DictTextClassifier(TextConfig()).to(F64).eval()
    x, xs = text_batch(g, 6), text_batch(g, 4)
    lin = fntk.Linearized(model)
    J = dense_jacobian(model, x)
    return model, lin, x, xs, J


def _loader(x: dict, size: int) -> list[dict]:
    n = next(iter(x.values())).shape[0]
    return [{k: v[i : i + size] for k, v in x.items()} for i in range(0, n, size)]


def test_products_against_the_dense_jacobian(case):
    model, lin, x, _, J = case
    n, k, p = J.shape
    assert (n, k, p) == (6, 3, lin.num_params)
    with torch.no_grad():
        f = model(**x)["logits"]
    assert rel_err(lin.forward(x), f) <= TOL
    assert rel_err(lin.jacobian(x), J) <= TOL
    V = torch.randn(p, 4, dtype=F64)
    U = torch.randn(n, k, 4, dtype=F64)
    assert rel_err(lin.jvp(x, V), torch.einsum("nkp,pr->nkr", J, V)) <= TOL
    assert rel_err(lin.jvp(x, V[:, 0]), J @ V[:, 0]) <= TOL
    assert rel_err(lin.vjp(x, U), torch.einsum("nkp,nkr->pr", J, U)) <= TOL
    w = lin.theta + 0.01 * V[:, 0]
    assert rel_err(lin(x, w), f + J @ (w - lin.theta)) <= TOL
    assert lin.capabilities.independent


@pytest.mark.parametrize("method", ["auto", "structured", "contraction", "products"])
def test_ntk_methods(case, method):
    _, lin, x, xs, J = case
    Js = dense_jacobian(case[0], xs)
    K = fntk.ntk(lin, x, xs, method=method)
    assert rel_err(K, torch.einsum("ikp,jlp->ikjl", J, Js)) <= TOL
    K0 = fntk.ntk(lin, x, method=method, outputs=0)
    assert rel_err(K0, J[:, 0] @ J[:, 0].T) <= TOL


def test_operators(case):
    _, lin, x, _, J = case
    n, k, p = J.shape
    Jm = J.reshape(n * k, p)
    V = torch.randn(p, 3, dtype=F64)
    U = torch.randn(n * k, 3, dtype=F64)
    Jop = fntk.JacobianOperator(lin, x)
    assert rel_err(Jop @ V, Jm @ V) <= TOL and rel_err(Jop.mT @ U, Jm.T @ U) <= TOL
    for dense in (False, True):
        Kop = fntk.NTKOperator(lin, x, dense=dense)
        assert rel_err(Kop @ U, Jm @ (Jm.T @ U)) <= TOL
    lik = Categorical()
    f = lin.forward(x)
    P = torch.softmax(f, -1)
    H = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J)
    for method in ("exact", "finite_difference", "autograd"):
        Gop = fntk.GGNOperator(lin, x, lik, method=method)
        tol = 1e-3 if method == "finite_difference" else TOL  # O(eps) by construction
        assert rel_err(Gop @ V, G @ V) <= tol, method
    assert rel_err(fntk.GGNOperator(lin, x, lik).diagonal(), G.diagonal()) <= TOL
    assert rel_err(ggn_diagonal(lin, x, lik, structured=False), G.diagonal()) <= TOL


def test_loader_of_dict_batches_equals_the_dict(case):
    _, lin, x, _, J = case
    batches = _loader(x, 4)  # batches of 4 and 2
    V = torch.randn(lin.num_params, 2, dtype=F64)
    U = torch.randn(6, 3, 2, dtype=F64)
    assert rel_err(lin.forward(batches), lin.forward(x)) <= TOL
    assert rel_err(lin.jacobian(batches), J) <= TOL
    assert rel_err(lin.jvp(batches, V), lin.jvp(x, V)) <= TOL
    assert rel_err(lin.vjp(batches, U), lin.vjp(x, U)) <= TOL
    G1 = fntk.GGNOperator(lin, x, Categorical())
    G2 = fntk.GGNOperator(lin, batches, Categorical())
    assert rel_err(G2 @ V, G1 @ V) <= TOL and rel_err(G2.diagonal(), G1.diagonal()) <= TOL


def test_integer_entries_pass_through_unchanged(case):
    _, lin, x, _, _ = case
    checked = lin.check_input(x)
    assert isinstance(checked, fntk.inputs.Batch)
    for key in x:
        assert checked.data[key].dtype == torch.int64 and torch.equal(checked.data[key], x[key])
    # a float entry is cast to the model's dtype, an int one is not
    given = {"a": torch.ones(2, 3), "ids": torch.ones(2, dtype=torch.int32)}
    mixed = fntk.linearize.checks.check_inputs(given, "x", F64, torch.device("cpu"), False)
    assert mixed.data["a"].dtype == F64 and mixed.data["ids"].dtype == torch.int32


def test_estimators_on_dict_inputs(case):
    model, _, x, xs, J = case
    g = torch.Generator().manual_seed(1)
    xtr = text_batch(g, 12)
    y = torch.tensor([0, 1, 2] * 4)
    clf = fntk.LinearizedClassifier(model, inference="laplace", prior_precision=1.0).fit(xtr, y)
    clf2 = fntk.LinearizedClassifier(model, inference="laplace", prior_precision=1.0).fit(
        [{**b, "labels": y[i : i + 5]} for i, b in zip(range(0, 12, 5), _loader(xtr, 5))])
    assert rel_err(clf2.predict_proba(xs), clf.predict_proba(xs)) <= TOL
    probs = clf.predict_proba(_loader(xs, 3))
    assert rel_err(probs, clf.predict_proba(xs)) <= TOL and probs.shape == (4, 3)
    # the function-space MAP equals the representer solution with the dense reference kernel
    assert clf.space_ == "function"
    yr = torch.sin(torch.arange(12, dtype=F64))
    reg = fntk.NTKRegressor(model, output=0).fit(xtr, yr)
    assert reg.model_ in ("network", "constant", "scaled")  # no input-kernel candidate for dicts
    post = reg.predict(xs)
    post2 = reg.predict(_loader(xs, 3))
    assert rel_err(post2.mean, post.mean) <= TOL and rel_err(post2.variance, post.variance) <= TOL


def test_joint_predictions_samples_and_saving(case, tmp_path):
    """The classifier's joint covariance and samples, and save/load, with dict inputs."""
    model, _, _, xs, _ = case
    g = torch.Generator().manual_seed(2)
    xtr, y = text_batch(g, 9), torch.tensor([0, 1, 2] * 3)
    clf = fntk.LinearizedClassifier(model, inference="laplace", prior_precision=1.0).fit(xtr, y)
    mean, cov = clf.predict_f_joint(xs)
    m1, c1 = clf.predict_f(xs)
    blocks = cov.reshape(4, 3, 4, 3).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert rel_err(mean, m1) <= TOL and rel_err(blocks, c1) <= TOL
    assert clf.sample(xs, 5, generator=torch.Generator().manual_seed(0)).shape == (5, 4, 3)
    clf.save(tmp_path / "clf.fntk")
    again = fntk.load(tmp_path / "clf.fntk", model)
    assert torch.equal(again.predict_proba(xs), clf.predict_proba(xs))


def test_regressor_against_the_dense_reference(case):
    """Fixed hyperparameters: the posterior mean and variance from the dense float64 kernel."""
    model, _, x, xs, J = case
    Js = dense_jacobian(model, xs)
    y = torch.cos(torch.arange(6, dtype=F64))
    reg = fntk.NTKRegressor(model, output=1, optimize=False, noise=0.1, scale=2.0, constant=0.0,
                            gp_model="network").fit(x, y)
    with torch.no_grad():
        f, fs = model(**x)["logits"][:, 1], model(**xs)["logits"][:, 1]
    K, Ks, Kss = 2 * J[:, 1] @ J[:, 1].T, 2 * Js[:, 1] @ J[:, 1].T, 2 * Js[:, 1] @ Js[:, 1].T
    A = K + 0.1 * torch.eye(6, dtype=F64)
    mean = fs + Ks @ torch.linalg.solve(A, y - f)
    var = (Kss - Ks @ torch.linalg.solve(A, Ks.T)).diagonal()
    for data in (xs, _loader(xs, 3)):
        post = reg.predict(data)
        assert rel_err(post.mean, mean) <= 1e-8 and rel_err(post.variance, var) <= 1e-8


def test_dict_refusals(case):
    _, lin, x, _, _ = case
    with pytest.raises(ValueError, match=r"x\['attention_mask'\] has 5 rows but x\['input_ids'\] has 6"):
        lin.forward({"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:5]})
    with pytest.raises(ValueError, match=r"expected the keys and trailing shapes"):
        lin.forward({"input_ids": x["input_ids"][:, :4], "attention_mask": x["attention_mask"][:, :4]})
    with pytest.raises(TypeError, match=r"x\['input_ids'\] must be a torch.Tensor"):
        lin.forward({"input_ids": [1, 2], "attention_mask": x["attention_mask"]})
    with pytest.raises(ValueError, match=r"x\['input_ids'\] is a scalar"):
        lin.forward({"input_ids": torch.tensor(1)})
    with pytest.raises(ValueError, match="empty dict"):
        lin.forward({})
    bad = _loader(x, 4)
    bad[1] = {"input_ids": bad[1]["input_ids"]}
    with pytest.raises(ValueError, match=r"batch 1 of x is a dict \{'input_ids'.*batch 0 was a dict"):
        lin.forward(bad)


class Packed(nn.Module):
    """The same network taking one int64 tensor (n, 2, L): ids and mask stacked (the tensor path)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, t):
        return self.m(input_ids=t[:, 0], attention_mask=t[:, 1])


CLASSIFIERS = {
    "vi": dict(inference="vi"),
    "vi_meanfield": dict(inference="vi", vi_family="meanfield"),
    "laplace_weight": dict(inference="laplace", space="weight"),
    "map_lbfgs": dict(inference="map", solver="lbfgs", batch_size=4),
    "laplace_cv": dict(inference="laplace", prior_precision="cv", cv_folds=3),
    "laplace_last_layer": dict(inference="laplace", params=["classifier.weight", "classifier.bias"]),
    "laplace_marglik": dict(inference="laplace", prior_precision="marglik"),
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_variants_equal_the_tensor_path(case, name):
    """Every backend on dict inputs equals the same network fed one packed tensor (float64)."""
    model = case[0]
    g = torch.Generator().manual_seed(3)
    x, xs = text_batch(g, 15), text_batch(g, 4)
    y = torch.tensor([0, 1, 2] * 5)
    kw = {"prior_precision": 1.0, **CLASSIFIERS[name]}
    params = kw.pop("params", None)
    a = fntk.LinearizedClassifier(model, params, **kw).fit(x, y)
    b = fntk.LinearizedClassifier(Packed(model), None if params is None else ["m." + p for p in params],
                                  **kw).fit(_packed(x), y)
    assert a.space_ == b.space_
    assert rel_err(a.predict_proba(xs), b.predict_proba(_packed(xs))) <= TOL
    assert rel_err(a.weights(), b.weights()) <= TOL


def _packed(x: dict) -> torch.Tensor:
    return torch.stack([x["input_ids"], x["attention_mask"]], 1)


# the automatic choice without input kernels: dict inputs leave them out (no feature vector)
@pytest.mark.parametrize("options", [dict(space="weight"), dict(solver="iterative"),
                                     dict(gp_model=["network", "constant", "scaled"])])
def test_regressor_variants_equal_the_tensor_path(case, options):
    model = case[0]
    g = torch.Generator().manual_seed(4)
    x, xs = text_batch(g, 12), text_batch(g, 4)
    y = torch.sin(torch.arange(12, dtype=F64))
    a = fntk.NTKRegressor(model, output=2, **options).fit(x, y)
    b = fntk.NTKRegressor(Packed(model), output=2, **options).fit(_packed(x), y)
    pa, pb = a.predict(xs), b.predict(_packed(xs))
    assert a.space_ == b.space_ and a.model_ == b.model_
    assert rel_err(pa.mean, pb.mean) <= TOL and rel_err(pa.variance, pb.variance) <= TOL
