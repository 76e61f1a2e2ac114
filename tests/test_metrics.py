"""fntk.metrics against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fntk import metrics

P = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
Y = torch.tensor([0, 0, 0])


def test_mse_rmse():
    assert metrics.mse(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(5 / 3)
    assert metrics.rmse(torch.tensor([[1.0], [2.0], [3.0]]), torch.ones(3)) == pytest.approx(math.sqrt(5 / 3))
    assert isinstance(metrics.mse(torch.zeros(2), torch.zeros(2)), float)


def test_gaussian_nll():
    got = metrics.gaussian_nll(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0]), torch.tensor([1.0, 1.0]))
    l2p = math.log(2 * math.pi)
    assert got == pytest.approx((0.5 * (l2p + 1.0) + 0.5 * (l2p + math.log(4.0))) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="var must be positive"):
        metrics.gaussian_nll(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(2))


def test_interval_coverage():
    y = torch.tensor([0.0, 1.9, 1.97, -1.95, 3.0])  # z(95%) = 1.95996
    assert metrics.interval_coverage(torch.zeros(5), torch.ones(5), y) == pytest.approx(3 / 5)
    # 68.27 % interval is ±1σ: with σ = 2, |y| <= 2 for 0, 1.9, 1.97, -1.95
    assert metrics.interval_coverage(torch.zeros(5), 4 * torch.ones(5), y, level=0.682689) == pytest.approx(
        4 / 5
    )


def test_accuracy_nll_brier():
    assert metrics.accuracy(P, Y) == pytest.approx(2 / 3)
    assert metrics.accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
    assert metrics.categorical_nll(P, Y) == pytest.approx(
        -(math.log(0.7) + math.log(0.4) + math.log(0.9)) / 3
    )
    assert metrics.brier(P, Y) == pytest.approx((0.18 + 0.72 + 0.02) / 3)
    assert metrics.categorical_nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(
        -math.log(1e-12)
    )


def test_ece():
    # confidences 0.7 (right), 0.6 (wrong), 0.9 (right) fall in three different bins
    assert metrics.ece(P, Y) == pytest.approx((0.3 + 0.6 + 0.1) / 3)
    # one bin: |accuracy − mean confidence| = |2/3 − 0.7333|
    assert metrics.ece(P, Y, n_bins=1) == pytest.approx(abs(2 / 3 - 2.2 / 3))
    # 0.71 (right) and 0.72 (wrong) share the bin (0.667, 0.733]: |0.5 − 0.715|
    p2 = torch.tensor([[0.71, 0.29], [0.28, 0.72]])
    assert metrics.ece(p2, torch.tensor([0, 0])) == pytest.approx(0.215)
    assert metrics.ece(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == pytest.approx(0.0)


def test_summaries():
    r = metrics.regression_metrics(torch.zeros(2), torch.ones(2), torch.tensor([0.0, 2.0]))
    assert r["mse"] == pytest.approx(2.0) and r["coverage"] == pytest.approx(0.5)
    c = metrics.classification_metrics(P, Y)
    assert c["accuracy"] == pytest.approx(2 / 3) and c["brier"] == pytest.approx(0.92 / 3)


def test_shape_and_value_errors():
    with pytest.raises(ValueError, match="as many points"):
        metrics.mse(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(n,\) or \(n, 1\)"):
        metrics.mse(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="not logits"):
        metrics.categorical_nll(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer class labels"):
        metrics.brier(P, Y.float())
    with pytest.raises(ValueError, match="0..1"):
        metrics.ece(P, torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError, match="3 rows"):
        metrics.accuracy(P, torch.tensor([0, 1]))
