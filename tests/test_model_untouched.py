"""The user's model never changes: parameters, buffers, .training, requires_grad, .grad and hook
counts are identical after every public call, after calls that raise, and after a fit interrupted
by KeyboardInterrupt (raised from the fit's callback)."""

from __future__ import annotations

import math

import pytest
import torch

import fntk
from fntk import persist
from fntk.likelihoods import Categorical

from models import SmallCNN
from reference import assert_same_fingerprint, fingerprint

F64 = torch.float64


def user_model() -> torch.nn.Module:
    """A CNN in *train* mode (BatchNorm, Dropout), with grads, a frozen parameter and hooks."""
    torch.manual_seed(0)
    m = SmallCNN(k=3).to(F64).train()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    m.conv.bias.requires_grad_(False)
    m.fc.register_forward_hook(lambda mod, i, o: None)
    m.conv.register_forward_pre_hook(lambda mod, i: None)
    return m


g = torch.Generator().manual_seed(3)
X = torch.randn(8, 1, 8, 8, dtype=F64, generator=g)
XT = torch.randn(3, 1, 8, 8, dtype=F64, generator=g)
Y = torch.randn(8, dtype=F64, generator=g)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _lin_calls(m):
    lin = fntk.Linearized(m)
    v = torch.randn(lin.num_params, dtype=F64, generator=torch.Generator().manual_seed(0))
    lin.forward(X)
    lin.jvp(X, v)
    lin.vjp(X, torch.ones(8, 3, dtype=F64))
    lin.jacobian(X)
    lin(X, lin.theta + 0.1 * v)
    for method in ("structured", "contraction", "products"):
        fntk.ntk(lin, X, XT, method=method)
    fntk.NTKOperator(lin, X).matmul(torch.ones(24, 2, dtype=F64))
    fntk.JacobianOperator(lin, X).to_dense()
    fntk.GGNOperator(lin, X, Categorical(), y=LABELS).matmul(v[:, None])


def _regressor_calls(m, tmp_path):
    for space in ("function", "weight"):
        reg = fntk.NTKRegressor(m, params=["fc.weight", "fc.bias"], space=space).fit(X, Y)
        post = reg.predict(XT)
        post.sample(2)
        reg.log_marginal_likelihood()
    persist.save(reg, tmp_path / "reg.pt")
    persist.load(tmp_path / "reg.pt", m).predict(XT)


def _classifier_calls(m, tmp_path):
    clf = fntk.LinearizedClassifier(m, params=["fc.weight", "fc.bias"]).fit(X, LABELS)  # λ by evidence
    for inference in ("map", "laplace", "vi"):
        kw = dict(vi_max_iter=5, vi_rank=4, vi_samples=4, num_samples=8, prior_precision=1.0)
        clf = fntk.LinearizedClassifier(m, inference=inference, **kw)
        clf.fit(X, LABELS)
        clf.predict_proba(XT)
        clf.predict(XT)
    clf.save(tmp_path / "clf.pt")
    persist.load(tmp_path / "clf.pt", m).predict(XT)


@pytest.mark.parametrize("calls", [_lin_calls, _regressor_calls, _classifier_calls])
def test_public_calls_leave_model_untouched(calls, tmp_path):
    m = user_model()
    before = fingerprint(m)
    if calls is _lin_calls:
        calls(m)
    else:
        calls(m, tmp_path)
    assert_same_fingerprint(before, fingerprint(m))
    assert m.training and m.bn.training  # still in train mode


def test_failing_calls_leave_model_untouched():
    m = user_model()
    before = fingerprint(m)
    bad = [
        lambda: fntk.Linearized(m).forward(torch.randn(2, 1, 5, 5, dtype=F64)),
        lambda: fntk.NTKRegressor(m).fit(X, Y[:3]),
        lambda: fntk.NTKRegressor(m).fit(X, torch.full_like(Y, float("nan"))),
        lambda: fntk.LinearizedClassifier(m).fit(X, LABELS + 5),
        lambda: fntk.GGNOperator(fntk.Linearized(m), X, Categorical(), y=LABELS[:2]),
        lambda: fntk.ntk(fntk.Linearized(m), X, method="nope"),
    ]
    for call in bad:
        with pytest.raises((ValueError, TypeError)):
            call()
    assert_same_fingerprint(before, fingerprint(m))


class _Stop:
    """A callback that raises KeyboardInterrupt on its ``at``-th call."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, info: dict) -> None:
        self.calls += 1
        assert "step" in info
        if self.calls >= self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("space", ["function", "weight"])
def test_keyboard_interrupt_during_classifier_fit(space):
    m = user_model()
    before = fingerprint(m)
    clf = fntk.LinearizedClassifier(m, space=space, prior_precision=1.0)
    stop = _Stop(at=2)
    with pytest.raises(KeyboardInterrupt):
        clf.fit(X, LABELS, callback=stop)
    assert stop.calls == 2
    assert_same_fingerprint(before, fingerprint(m))
    with pytest.raises(ValueError, match="not fitted"):
        clf.predict(XT)
    # the interrupted classifier can be fitted again, and then matches a fresh fit
    fresh = fntk.LinearizedClassifier(m, space=space, prior_precision=1.0).fit(X, LABELS)
    assert torch.equal(clf.fit(X, LABELS).predict_proba(XT), fresh.predict_proba(XT))
    assert_same_fingerprint(before, fingerprint(m))


@pytest.mark.parametrize("space", ["function", "weight"])
def test_keyboard_interrupt_during_regressor_fit(space):
    m = user_model()
    before = fingerprint(m)
    y = torch.randn(8, dtype=F64, generator=torch.Generator().manual_seed(0))
    reg = fntk.NTKRegressor(m, output=1, space=space)
    stop = _Stop(at=3)
    with pytest.raises(KeyboardInterrupt):
        reg.fit(X, y, callback=stop)
    assert stop.calls == 3
    assert_same_fingerprint(before, fingerprint(m))
    with pytest.raises(ValueError, match="not fitted"):
        reg.predict(XT)
    seen: list[dict] = []
    reg.fit(X, y, callback=seen.append)  # a full fit reports every marginal-likelihood evaluation
    assert [s["step"] for s in seen] == list(range(len(seen))) and len(seen) > 10
    vals = [float(s["log_marginal_likelihood"][0]) for s in seen]  # standardised units
    assert all(map(math.isfinite, vals)) and vals[-1] >= max(vals) - 1e-6 * (1 + abs(max(vals)))
    assert_same_fingerprint(before, fingerprint(m))
