"""Output selection through the estimators and save/load: a model returning a tuple or a dict
gives the same fits as the equivalent tensor model; the adapter reloads with the same output_fn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fntk

from models import tanh_mlp

F64 = torch.float64
g = torch.Generator().manual_seed(3)
X, XT = torch.randn(14, 3, dtype=F64, generator=g), torch.randn(5, 3, dtype=F64, generator=g)
Y = torch.sin(X[:, 0]) + 0.1 * torch.randn(14, dtype=F64, generator=g)
LABELS = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()


class Outputs(nn.Module):
    """The tensor net's output inside a tuple (with an extra tensor) or a dict with 'logits'."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        out = self.net(x)
        return (2.0 * out, out) if self.kind == "tuple" else {"hidden": x, "logits": out}


def _net(k: int) -> nn.Module:
    torch.manual_seed(0)
    return tanh_mlp(d_in=3, width=8, k=k).to(F64)


def test_regressor_and_classifier_take_output_fn_and_dict_logits(tmp_path):
    net1, net3 = _net(1), _net(3)
    ref = fntk.NTKRegressor(net1).fit(X, Y).predict(XT)
    reg = fntk.NTKRegressor(Outputs(net1, "tuple"), output_fn=lambda out: out[1]).fit(X, Y)
    post = reg.predict(XT)
    torch.testing.assert_close(post.mean, ref.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(post.variance, ref.variance, rtol=1e-8, atol=1e-12)
    clf_ref = fntk.LinearizedClassifier(net3, prior_precision=1.0).fit(X, LABELS).predict_proba(XT)
    clf = fntk.LinearizedClassifier(Outputs(net3, "dict"), prior_precision=1.0).fit(X, LABELS)  # its logits
    torch.testing.assert_close(clf.predict_proba(XT), clf_ref, rtol=1e-10, atol=1e-12)
    kernel = fntk.gp.NTKKernel(Outputs(net1, "tuple"), output_fn=lambda out: out[1])
    torch.testing.assert_close(kernel(X, XT).to_dense(), fntk.gp.NTKKernel(net1)(X, XT).to_dense())

    path = tmp_path / "reg.fntk"
    reg.save(path)
    model = Outputs(net1, "tuple")
    back = fntk.load(path, model, output_fn=lambda out: out[1])
    assert torch.equal(back.predict(XT).mean, post.mean)
    with pytest.raises(ValueError, match="fitted with an output_fn; pass the same one"):
        fntk.load(path, model)
    clf.save(tmp_path / "clf.fntk")
    with pytest.raises(ValueError, match="fitted without an output_fn"):
        fntk.load(tmp_path / "clf.fntk", Outputs(net3, "dict"), output_fn=lambda out: out["logits"])
    assert torch.equal(fntk.load(tmp_path / "clf.fntk", Outputs(net3, "dict")).predict_proba(XT),
                       clf.predict_proba(XT))


def test_output_fn_with_a_linearized_is_refused():
    lin = fntk.Linearized(_net(1))
    with pytest.raises(ValueError, match="output_fn must be None when model is already a fntk.Linearized"):
        fntk.NTKRegressor(lin, output_fn=lambda out: out)
    with pytest.raises(ValueError, match="params, memory_budget must be None"):
        fntk.LinearizedClassifier(lin, params=["0.weight"], memory_budget=10**8)
