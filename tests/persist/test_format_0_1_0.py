"""Adapters saved by fntk 0.1.0 (before the package restructure) still load and predict bit for bit.

The files in tests/persist/fixtures/format_0_1_0 were written by its make.py at commit 68c6671.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fntk

HERE = Path(__file__).parent / "fixtures" / "format_0_1_0"
EXPECTED = torch.load(HERE / "expected.pt", weights_only=True)
XT = EXPECTED["XT"]
CASES = sorted(k for k in EXPECTED if k != "XT")


def _model(name: str) -> torch.nn.Module:
    k = EXPECTED[name]["k"]
    layers, d = [], 3
    for _ in range(2):
        layers += [torch.nn.Linear(d, 8), torch.nn.Tanh()]
        d = 8
    layers.append(torch.nn.Linear(d, k))
    m = torch.nn.Sequential(*layers).to(torch.float64)
    m.load_state_dict(torch.load(HERE / f"{name}.model.pt", weights_only=True))
    return m


@pytest.mark.parametrize("name", CASES)
def test_format_0_1_0_loads_bit_for_bit(name):
    exp = EXPECTED[name]
    obj = fntk.load(HERE / f"{name}.fntk", _model(name))
    if name.startswith("reg_"):
        assert isinstance(obj, fntk.NTKRegressor)
        post = obj.predict(XT)
        assert torch.equal(post.mean, exp["mean"]) and torch.equal(post.variance, exp["variance"])
        assert torch.equal(post.covariance_matrix, exp["covariance"])
        assert torch.equal(torch.as_tensor(obj.log_marginal_likelihood()), exp["lml"])
    else:
        assert isinstance(obj, fntk.LinearizedClassifier)
        assert torch.equal(obj.predict_proba(XT), exp["proba"])
        assert torch.equal(obj.weights(), exp["weights"])
        mean, cov = obj.predict_f(XT)
        assert torch.equal(mean, exp["mean"])
        assert torch.equal(torch.zeros(0) if cov is None else cov, exp["cov"])
