"""NTKKernel inside gpytorch.models.ExactGP against a dense float64 reference GP."""

import math

import gpytorch
import pytest
import torch

import fntk
from fntk.gp import NTKKernel, NTKRegressor

from models import tanh_mlp
from reference import assert_same_fingerprint, dense_jacobian, fingerprint, rel_err

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class NTKGP(gpytorch.models.ExactGP):
    """The paper's README pattern, with a ScaleKernel around the NTK."""

    def __init__(self, x, y, likelihood, net, **kernel_kwargs):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(NTKKernel(net, **kernel_kwargs))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def setup(n, width, k=2, seed=0):
    torch.manual_seed(seed)
    net = tanh_mlp(d_in=2, width=width, k=k).to(F64)
    x = torch.randn(n, 2, dtype=F64)
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, dtype=F64)
    xs = torch.randn(7, 2, dtype=F64)
    return net, x, y, xs


def make_gp(net, x, y, space="auto", s=0.7, noise=0.05, b=0.3):
    lik = gpytorch.likelihoods.GaussianLikelihood().to(F64)
    gp = NTKGP(x, y, lik, net, space=space).to(F64)
    gp.covar_module.outputscale = s
    lik.noise = noise
    gp.mean_module.constant.data.fill_(b)
    return gp, lik


def reference(net, x, y, xs, s, noise, b, output=0):
    J, Js = dense_jacobian(net, x)[:, output], dense_jacobian(net, xs)[:, output]
    n = x.shape[0]
    L = torch.linalg.cholesky(s * J @ J.T + noise * torch.eye(n, dtype=F64))
    r = y - b
    alpha = torch.cholesky_solve(r[:, None], L)[:, 0]
    W = torch.linalg.solve_triangular(L, s * J @ Js.T, upper=False)
    lml = -0.5 * r @ alpha - L.diagonal().log().sum() - 0.5 * n * math.log(2 * math.pi)
    return b + s * Js @ J.T @ alpha, s * Js @ Js.T - W.T @ W, float(lml)


@pytest.mark.parametrize("space", ["function", "weight", "auto"])
@pytest.mark.parametrize("shape", [(40, 8), (60, 3)], ids=["n<p", "n>p"])
def test_exact_gp_matches_reference(space, shape):
    net, x, y, xs = setup(*shape)
    fp = fingerprint(net)
    gp, lik = make_gp(net, x, y, space)
    # reference at GPyTorch's actual (constrained, float32-initialised) hyperparameter values
    s, noise = float(gp.covar_module.outputscale.detach()), float(lik.noise.detach())
    b = float(gp.mean_module.constant.detach())
    mean, cov, lml = reference(net, x, y, xs, s, noise, b)
    gp.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    val = mll(gp(x), y) * x.shape[0]
    assert abs(float(val.detach()) - lml) <= 1e-8 * abs(lml)
    val.backward()
    assert gp.covar_module.raw_outputscale.grad is not None
    gp.eval()
    lik.eval()
    with torch.no_grad():
        post = gp(xs)
    weight = space == "weight" or (space == "auto" and shape == (60, 3))
    assert gp.prediction_strategy.weight_space is weight
    assert rel_err(post.mean, mean) <= 1e-8
    assert rel_err(post.covariance_matrix, cov) <= 1e-8
    with torch.no_grad(), gpytorch.settings.fast_pred_var():
        gp.prediction_strategy = None
        fast = gp(xs)
        assert rel_err(fast.mean, mean) <= 1e-8
        assert rel_err(fast.variance, cov.diagonal()) <= 1e-6
    assert_same_fingerprint(fp, fingerprint(net))


def test_kernel_returns_ntk_operator_and_exact_diagonal():
    net, x, _, xs = setup(10, 5)
    k = NTKKernel(net, output=1)
    J, Js = dense_jacobian(net, x)[:, 1], dense_jacobian(net, xs)[:, 1]
    K = k(x, xs).to_dense()
    assert rel_err(K, J @ Js.T) <= 1e-12
    op = k(x).evaluate_kernel()
    assert isinstance(op, fntk.NTKOperator)
    assert rel_err(k(x, diag=True), (J * J).sum(-1)) <= 1e-12
    assert rel_err(k(xs[:5], x[:5], diag=True), (Js[:5] * J[:5]).sum(-1)) <= 1e-12
    scaled = gpytorch.kernels.ScaleKernel(k).to(F64)
    with torch.no_grad():
        assert rel_err(scaled(x, diag=True), scaled.outputscale * (J * J).sum(-1)) <= 1e-12


def test_network_weights_are_not_hyperparameters():
    net, x, y, _ = setup(30, 5)
    fp = fingerprint(net)
    gp, lik = make_gp(net, x, y)
    names = {n for n, _ in gp.named_parameters()}
    assert names == {
        "likelihood.noise_covar.raw_noise",
        "mean_module.raw_constant",
        "covar_module.raw_outputscale",
    }
    gp.train()
    lik.train()
    opt = torch.optim.Adam(gp.parameters(), lr=0.05)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = -mll(gp(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert_same_fingerprint(fp, fingerprint(net))


@pytest.mark.filterwarnings("ignore::linear_operator.utils.warnings.NumericalWarning")
def test_cg_and_lanczos_path():
    """GPyTorch's matrix-free path (CG + stochastic Lanczos quadrature) on the NTKOperator."""
    net, x, y, xs = setup(50, 6)
    gp, lik = make_gp(net, x, y, space="function")
    s, noise, b = (
        float(gp.covar_module.outputscale.detach()),
        float(lik.noise.detach()),
        float(gp.mean_module.constant.detach()),
    )
    mean, cov, lml = reference(net, x, y, xs, s, noise, b)
    gp.eval()
    lik.eval()
    with (
        torch.no_grad(),
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.eval_cg_tolerance(1e-8),
        gpytorch.settings.max_cg_iterations(200),
    ):
        post = gp(xs)
        assert rel_err(post.mean, mean) <= 1e-5
    gp.train()
    lik.train()
    with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.num_trace_samples(64):
        val = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)(gp(x), y) * x.shape[0]
    assert abs(float(val.detach()) - lml) <= 0.05 * abs(lml)


def test_kernel_matches_regressor():
    """NTKRegressor(mean="constant") and ExactGP + ScaleKernel(NTKKernel) are the same model."""
    net, x, y, xs = setup(40, 6)
    gp, lik = make_gp(net, x, y)
    s, noise, b = (
        float(gp.covar_module.outputscale.detach()),
        float(lik.noise.detach()),
        float(gp.mean_module.constant.detach()),
    )
    reg = NTKRegressor(net, mean="constant", scale=s, noise=noise, constant=b, optimize=False).fit(x, y)
    gp.eval()
    lik.eval()
    with torch.no_grad():
        post = gp(xs)
    mine = reg.predict(xs)
    assert rel_err(mine.mean, post.mean) <= 1e-8 and rel_err(mine.variance, post.variance) <= 1e-8


def test_input_shape_and_errors():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    )
    net = net.to(F64)
    x = torch.randn(6, 12, dtype=F64)
    k = NTKKernel(net, input_shape=(3, 4))
    J = dense_jacobian(net, x.reshape(6, 3, 4))[:, 0]
    assert rel_err(k(x).to_dense(), J @ J.T) <= 1e-12
    with pytest.raises(ValueError, match="space must be one of"):
        NTKKernel(net, space="dual")
    with pytest.raises(ValueError, match="output must be an int"):
        NTKKernel(net, output="mean")
    with pytest.raises(ValueError, match=r"must have shape \(n, d\)"):
        NTKKernel(net)(torch.randn(2, 6, 12, dtype=F64)).to_dense()
    with pytest.raises(ValueError, match="out of range"):
        NTKKernel(net, output=2)(x.reshape(6, 12)[:, :12]).to_dense()
