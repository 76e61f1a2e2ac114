"""fntk.baselines against closed forms and dense references (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fntk import baselines
from fntk.data import digits, nets, paths

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- BLR / ABLR
def _dense_blr(phi, y, phi_t, alpha, beta):
    """Function-space (GP) form of BLR: K = α⁻¹ΦΦᵀ, Σ = K + β⁻¹I."""
    S = phi @ phi.T / alpha + torch.eye(len(y), dtype=D64) / beta
    lml = torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=D64), S).log_prob(y)
    ks = phi @ phi_t.T / alpha
    mean = ks.T @ torch.linalg.solve(S, y)
    var = (phi_t * phi_t).sum(1) / alpha - (ks * torch.linalg.solve(S, ks)).sum(0)
    return lml, mean, var


def test_blr_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    phi, phi_t = torch.randn(15, 6, generator=g, dtype=D64), torch.randn(7, 6, generator=g, dtype=D64)
    y = torch.randn(15, generator=g, dtype=D64)
    for alpha, beta in [(0.5, 4.0), (3.0, 0.2)]:
        lml, mean, var = _dense_blr(phi, y, phi_t, alpha, beta)
        got = baselines.blr_log_marginal_likelihood(phi, y, alpha, beta)
        assert got.item() == pytest.approx(lml.item(), abs=1e-10)
        pred = baselines.blr_predict(phi, y, phi_t, alpha, beta)
        assert torch.allclose(pred.mean, mean, atol=1e-10) and torch.allclose(pred.variance, var, atol=1e-10)
        assert pred.noise == pytest.approx(1 / beta)
        assert torch.allclose(pred.predictive_variance, var + 1 / beta)


def test_ablr_learns_a_shared_basis():
    # Source tasks y = a·sin(x): the function class is one-dimensional, so after joint training a
    # target with 5 points is predicted almost exactly on the whole interval.
    g = torch.Generator().manual_seed(1)
    tasks = []
    for a in torch.linspace(-3, 3, 8).tolist():
        x = 10 * torch.rand(30, 1, generator=g, dtype=D64) - 5
        tasks.append((x, a * torch.sin(x[:, 0]) + 0.01 * torch.randn(30, generator=g, dtype=D64)))
    model = baselines.ABLR(widths=(1, 40, 40, 50), seed=0).fit(tasks, steps=600, lr=1e-2)
    assert model.history_[-1] < model.history_[0] - 2.0
    assert model.log_hypers_.shape == (8, 2)
    x = 10 * torch.rand(5, 1, generator=g, dtype=D64) - 5
    xt = torch.linspace(-5, 5, 101, dtype=D64).unsqueeze(1)
    pred = model.predict(x, 1.7 * torch.sin(x[:, 0]), xt)
    mse = (pred.mean - 1.7 * torch.sin(xt[:, 0])).square().mean().item()
    assert mse < 0.02 * 1.7**2 / 2  # < 2 % of the target's variance
    fixed = model.predict(x, 1.7 * torch.sin(x[:, 0]), xt, fit_hyperparameters=False)
    assert pred.info["log_marginal_likelihood"] >= fixed.info["log_marginal_likelihood"]
    # with fixed hyperparameters ABLR's predictive is exactly BLR on its features
    ref = baselines.blr_predict(model.features(x), 1.7 * torch.sin(x[:, 0]), model.features(xt), 2.0, 50.0)
    same = model.predict(x, 1.7 * torch.sin(x[:, 0]), xt, fit_hyperparameters=False, alpha=2.0, beta=50.0)
    assert torch.allclose(same.mean, ref.mean, atol=1e-12) and torch.allclose(same.variance, ref.variance)


# ----------------------------------------------------------------------------- RBF GP
def _numpy_gp(x, y, xs, ls, os_, noise, c):
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return os_ * np.exp(-0.5 * d2 / ls**2)

    K = k(x, x) + noise * np.eye(len(x))
    Ks = k(x, xs)
    mean = c + Ks.T @ np.linalg.solve(K, y - c)
    var = os_ - np.sum(Ks * np.linalg.solve(K, Ks), 0)
    return mean, var


@pytest.mark.parametrize("standardize", [True, False])
def test_rbf_gp_matches_dense_numpy_at_fixed_hyperparameters(standardize):
    rng = np.random.default_rng(0)
    x, xs = rng.uniform(-2, 2, (12, 2)), rng.uniform(-2, 2, (9, 2))
    y = np.sin(x[:, 0]) + x[:, 1] ** 2 + 0.1 * rng.standard_normal(12)
    hyp = {"lengthscale": 0.8, "outputscale": 1.7, "noise": 0.05, "mean": 0.3}
    pred = baselines.rbf_gp(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xs), standardize=standardize, **hyp
    )
    mean, var = _numpy_gp(x, y, xs, 0.8, 1.7, 0.05, 0.3)
    assert np.allclose(pred.mean.numpy(), mean, atol=1e-8) and np.allclose(
        pred.variance.numpy(), var, atol=1e-8
    )
    assert pred.noise == pytest.approx(0.05) and pred.info["outputscale"] == pytest.approx(1.7)


def test_rbf_gp_learns_hyperparameters():
    g = torch.Generator().manual_seed(2)
    x = 10 * torch.rand(40, generator=g, dtype=D64) - 5
    y = 3.0 * torch.sin(x) + 5.0 + 0.1 * torch.randn(40, generator=g, dtype=D64)
    xt = torch.linspace(-4.5, 4.5, 50, dtype=D64)
    adam = baselines.rbf_gp(x, y, xt, steps=300)
    lbfgs = baselines.rbf_gp(x, y, xt, steps=100, optimizer="lbfgs")
    for pred in (adam, lbfgs):
        assert (pred.mean - (3.0 * torch.sin(xt) + 5.0)).square().mean().item() < 0.01
        assert 0.1**2 / 3 < pred.noise < 0.1**2 * 3
        assert pred.variance.min() > 0
    assert (
        lbfgs.info["log_marginal_likelihood_per_point"]
        >= adam.info["log_marginal_likelihood_per_point"] - 1e-3
    )
    with pytest.raises(ValueError, match="optimizer"):
        baselines.rbf_gp(x, y, xt, optimizer="sgd")


def test_rbf_gp_ard_matches_dense_numpy_at_fixed_lengthscales():
    rng = np.random.default_rng(3)
    x, xs = rng.uniform(-2, 2, (10, 2)), rng.uniform(-2, 2, (7, 2))
    y = np.sin(x[:, 0]) + 0.1 * rng.standard_normal(10)
    pred = baselines.rbf_gp(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xs),
                            lengthscale=[0.7, 3.0], outputscale=1.3, noise=0.02, mean=0.1)
    scale = np.array([0.7, 3.0])
    mean, var = _numpy_gp(x / scale, y, xs / scale, 1.0, 1.3, 0.02, 0.1)
    assert np.allclose(pred.mean.numpy(), mean, atol=1e-8)
    assert np.allclose(pred.variance.numpy(), var, atol=1e-8)


def test_rbf_gp_multistart_keeps_the_best_evidence_and_ard_finds_the_irrelevant_input():
    g = torch.Generator().manual_seed(4)
    x = 4 * torch.rand(30, 2, generator=g, dtype=D64) - 2
    y = torch.sin(2 * x[:, 0]) + 0.05 * torch.randn(30, generator=g, dtype=D64)  # x[:, 1] is irrelevant
    xt = 4 * torch.rand(20, 2, generator=g, dtype=D64) - 2
    one = baselines.rbf_gp(x, y, xt, restarts=1)
    five = baselines.rbf_gp(x, y, xt, restarts=5)
    starts = five.info["start_log_marginal_likelihoods"]
    assert len(starts) == 5 and five.info["best_start"] == int(np.argmax(starts))
    assert starts[0] == pytest.approx(one.info["start_log_marginal_likelihoods"][0], rel=1e-12)
    lml = "log_marginal_likelihood_per_point"
    assert five.info[lml] >= one.info[lml] - 1e-12
    ls = five.info["lengthscale"]
    assert ls[1] > 5 * ls[0]  # ARD: the irrelevant dimension gets a much longer lengthscale
    assert (five.mean - torch.sin(2 * xt[:, 0])).square().mean() < 0.01
    with pytest.raises(ValueError, match="restarts"):
        baselines.rbf_gp(x, y, xt, restarts=0)


# ----------------------------------------------------------------------------- fine-tuning
def _toy_regression():
    torch.manual_seed(0)
    model = nets.mlp([1, 16, 16, 1], "tanh")
    x = torch.linspace(-2, 2, 30).unsqueeze(1)
    return model, x, torch.sin(2 * x[:, 0])


def test_finetune_leaves_model_unchanged_and_lowers_loss():
    model, x, y = _toy_regression()
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist: list[float] = []
    tuned = baselines.finetune(model, x, y, params="all", loss="mse", epochs=200, lr=1e-2, history=hist)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (
        model.training
        and not model[0].weight.requires_grad
        and all(p.grad is None for p in model.parameters())
    )
    assert tuned is not model and tuned.training and not tuned[0].weight.requires_grad
    assert torch.equal(tuned[0].weight, model[0].weight)  # frozen parameters are not "all" trainable
    assert len(hist) == 200 and hist[-1] < 0.1 * hist[0]
    with torch.no_grad():
        assert ((tuned(x)[:, 0] - y) ** 2).mean() < ((model(x)[:, 0] - y) ** 2).mean() * 0.1


def test_finetune_last_layer_only_and_reproducible():
    model, x, y = _toy_regression()
    assert baselines.last_layer_names(model) == ["4.weight", "4.bias"]
    a = baselines.finetune(model, x, y, params="last", epochs=50, lr=1e-2, seed=3)
    b = baselines.finetune(model, x, y, params="last", epochs=50, lr=1e-2, seed=3)
    for (n, p), q in zip(a.named_parameters(), model.parameters()):
        assert torch.equal(p, q) == (not n.startswith("4."))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_finetune_cv_chooses_from_grid():
    model, x, y = _toy_regression()
    tuned, info = baselines.finetune_cv(model, x, y, loss="mse", lrs=(1e-4, 1e-2), epochs=(5, 60), folds=3)
    assert set(info["scores"]) == {(1e-4, 5), (1e-4, 60), (1e-2, 5), (1e-2, 60)}
    assert (info["lr"], info["epochs"]) == min(info["scores"], key=info["scores"].get) == (1e-2, 60)
    with torch.no_grad():
        assert ((tuned(x)[:, 0] - y) ** 2).mean() < ((model(x)[:, 0] - y) ** 2).mean()


def test_finetune_classification_with_callable_loss_errors():
    torch.manual_seed(0)
    model = nets.mlp([2, 8, 3], "relu")
    x, y = torch.randn(20, 2), torch.arange(20) % 3
    tuned = baselines.finetune(model, x, y, loss="ce", epochs=5)
    assert tuned(x).shape == (20, 3)
    with pytest.raises(ValueError, match="integer labels"):
        baselines.finetune(model, x, y.float(), loss="ce")
    with pytest.raises(ValueError, match="unknown parameter"):
        baselines.finetune(model, x, y, params=["nope"], loss="ce")


# ----------------------------------------------------------------------------- logistic regression
def test_last_layer_logreg_weight_decay_is_the_l2_penalty():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    X = torch.randn(60, 4, generator=g, dtype=D64) + 4.0 * torch.nn.functional.one_hot(y, 4).to(D64)
    fit = baselines.last_layer_logreg(X, y, weight_decay=0.7)
    W = torch.tensor(fit.classifier.coef_, requires_grad=True)
    b = torch.tensor(fit.classifier.intercept_, requires_grad=True)
    obj = torch.nn.functional.cross_entropy(X @ W.T + b, y, reduction="sum") + 0.35 * W.square().sum()
    obj.backward()
    assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4  # stationary point of Σ CE + λ/2 ‖W‖²
    cv = baselines.last_layer_logreg(X, y, num_classes=4, folds=5)
    assert len(cv.cv_nll) == 13 and cv.weight_decay == min(cv.cv_nll, key=lambda k: (cv.cv_nll[k], -k))
    p = cv.predict_proba(X)
    assert (
        p.shape == (60, 4) and torch.all(p[:, 3] == 0) and torch.allclose(p.sum(1), torch.ones((), dtype=D64))
    )
    assert (cv.predict(X) == y).double().mean() > 0.9


def test_logreg_few_labels_per_class():
    g = torch.Generator().manual_seed(1)
    y1 = torch.arange(10)
    X1 = torch.randn(10, 12, generator=g, dtype=D64) + 3.0 * torch.nn.functional.one_hot(y1, 12).to(D64)
    one = baselines.last_layer_logreg(X1, y1, folds=5)  # no held-out class is ever seen in training
    assert one.weight_decay == 1.0 and one.cv_nll == {} and (one.predict(X1) == y1).all()
    y2 = torch.arange(20) % 10
    X2 = torch.randn(20, 12, generator=g, dtype=D64) + 3.0 * torch.nn.functional.one_hot(y2, 12).to(D64)
    two = baselines.last_layer_logreg(X2, y2, folds=5)  # stratified 2-fold
    assert len(two.cv_nll) == 13 and all(math.isfinite(v) for v in two.cv_nll.values())
    assert two.weight_decay < 1000.0  # the classes are separable: CV does not pick the strongest decay


def test_penultimate_features_of_lenet5():
    torch.manual_seed(0)
    net = nets.LeNet5().train()
    x = torch.rand(5, 1, 28, 28)
    f = baselines.penultimate_features(net, x, batch_size=2)
    with torch.no_grad():
        assert torch.allclose(f, net.features(x), atol=1e-5) and f.shape == (5, 200)
    assert net.training


def test_pretrained_lenet5_on_usps():
    root = paths.default_root()
    if root is None or not (root / nets.LENET5_FILE).is_file() or not (root / digits.USPS_FILE).is_file():
        pytest.skip(
            "real data absent: set FNTK_DATA to a folder laid out like shared/data (LeNet5 weights + USPS)"
        )
    net = nets.load_pretrained_lenet5(root)
    assert not net.training and sum(p.numel() for p in net.parameters()) == 648226
    x, y = digits.load_usps(root, "test")
    with torch.no_grad():
        acc = (net(x[:500]).argmax(1) == y[:500]).double().mean().item()
    assert acc > 0.9
