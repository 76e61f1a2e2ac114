"""Bayesian regression baselines: ABLR (Bayesian linear regression on learned features).

The regression baselines (this and :func:`fntk.baselines.gp.rbf_gp`) return a
:class:`GaussianPrediction`: the latent function's predictive mean and variance at the test points
and the observation-noise variance (add it for the predictive of noisy targets).

Bayesian linear regression (BLR) on features Φ (n, D): w ~ N(0, α⁻¹ I), y = Φw + ε,
ε ~ N(0, β⁻¹ I). With A = αI + βΦᵀΦ = LLᵀ the posterior is N(βA⁻¹Φᵀy, A⁻¹) and

    −log p(y) = ½[β‖y‖² − β²‖L⁻¹Φᵀy‖² + 2Σ log L_jj − D log α − n log β + n log 2π],

all in O(nD² + D³).

These problems are small (D ≈ 50 features, n ≤ a few thousand points), so the routines run torch
single-threaded (restoring the setting afterwards): with more threads than free cores, torch's
spinning thread pool made them 15-30x slower on a loaded machine, for no gain otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)


@contextmanager
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class GaussianPrediction:
    """A Gaussian predictive at m test points.

    Attributes:
        mean: (m,) predictive mean.
        variance: (m,) variance of the latent function (without observation noise).
        noise: observation-noise variance (a float).
        info: fitted hyperparameters and diagnostics.
    """

    mean: Tensor
    variance: Tensor
    noise: float
    info: dict = field(default_factory=dict)

    @property
    def predictive_variance(self) -> Tensor:
        """(m,) variance of a new noisy observation: ``variance + noise``."""
        return self.variance + self.noise


# ----------------------------------------------------------------------------- BLR
def _blr_parts(phi: Tensor, y: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    D = phi.shape[1]
    A = alpha * torch.eye(D, dtype=phi.dtype, device=phi.device) + beta * (phi.T @ phi)
    L = torch.linalg.cholesky(A)
    c = torch.linalg.solve_triangular(L, (phi.T @ y).unsqueeze(1), upper=False)
    return L, c


def blr_log_marginal_likelihood(
    phi: Tensor, y: Tensor, alpha: Tensor | float, beta: Tensor | float
) -> Tensor:
    """log N(y; 0, β⁻¹I + α⁻¹ΦΦᵀ), differentiable in Φ, α and β.

    Args:
        phi: (n, D) features. y: (n,) targets. alpha: prior precision. beta: noise precision.
    """
    if phi.ndim != 2 or y.shape != (phi.shape[0],):
        raise ValueError(f"need phi (n, D) and y (n,), got {tuple(phi.shape)} and {tuple(y.shape)}")
    alpha, beta = torch.as_tensor(alpha, dtype=phi.dtype), torch.as_tensor(beta, dtype=phi.dtype)
    n, D = phi.shape
    L, c = _blr_parts(phi, y, alpha, beta)
    quad = beta * y.square().sum() - beta.square() * c.square().sum()
    logdet = 2 * torch.log(torch.diagonal(L)).sum() - D * torch.log(alpha) - n * torch.log(beta)
    return -0.5 * (quad + logdet + n * _LOG_2PI)


def blr_predict(
    phi: Tensor, y: Tensor, phi_test: Tensor, alpha: Tensor | float, beta: Tensor | float
) -> GaussianPrediction:
    """BLR posterior predictive at features phi_test (m, D): mean φᵀμ, variance φᵀA⁻¹φ, noise 1/β."""
    alpha, beta = torch.as_tensor(alpha, dtype=phi.dtype), torch.as_tensor(beta, dtype=phi.dtype)
    L, c = _blr_parts(phi, y, alpha, beta)
    # μ = β A⁻¹ Φᵀy = β L⁻ᵀ c
    mu = beta * torch.linalg.solve_triangular(L.T, c, upper=True).squeeze(1)
    v = torch.linalg.solve_triangular(L, phi_test.T, upper=False)
    return GaussianPrediction(
        mean=(phi_test @ mu).detach(),
        variance=v.square().sum(0).detach(),
        noise=float(1.0 / beta),
        info={"alpha": float(alpha), "beta": float(beta), "weights": mu.detach()},
    )


_ACT: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


class ABLR:
    """Adaptive Bayesian linear regression (Perrone et al., NeurIPS 2018).

    A shared feature net φ (default 1-40-40-50 tanh) with one BLR per task, each with its own
    prior precision α_t and noise precision β_t. :meth:`fit` maximises Σ_t log p(y_t | φ, α_t, β_t)
    jointly over the net and all (α_t, β_t) with Adam. :meth:`predict` freezes φ, fits the target
    task's (α, β) by its own marginal likelihood and returns the BLR predictive.

    Args:
        widths: feature-net widths, input first and D last.
        activation: ``"tanh"``, ``"relu"`` or ``"elu"``, after every layer except the last.
        seed: initialises the net.
        dtype: computation dtype (float64 by default; the nets are small).
    """

    def __init__(
        self,
        widths: Sequence[int] = (1, 40, 40, 50),
        activation: str = "tanh",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        widths = list(widths)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                layers.append(nn.Linear(a, b))
                if i < len(widths) - 2:
                    layers.append(_ACT[activation]())
            self.net = nn.Sequential(*layers).to(dtype)
        self.dtype = dtype
        self.log_hypers_: Tensor | None = None  # (T, 2): log α_t, log β_t
        self.history_: list[float] = []

    def _phi(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x).to(self.dtype)
        return self.net(x if x.ndim == 2 else x.unsqueeze(1))

    def features(self, x: Tensor) -> Tensor:
        """(n, d_in) or (n,) inputs → (n, D) features (detached)."""
        with torch.no_grad():
            return self._phi(x)

    @one_thread()
    def fit(self, tasks: Sequence[tuple[Tensor, Tensor]], steps: int = 2000, lr: float = 1e-2) -> ABLR:
        """Train the feature net and the per-task (α_t, β_t) on source tasks [(x_t (n_t, d), y_t (n_t,))].

        The loss is the summed negative log marginal likelihood divided by the total number of
        points (recorded per step in ``history_``). Returns self.
        """
        data = [
            (torch.as_tensor(x).to(self.dtype), torch.as_tensor(y).to(self.dtype).reshape(-1))
            for x, y in tasks
        ]
        if not data:
            raise ValueError("fit needs at least one source task")
        total = sum(y.numel() for _, y in data)
        init = [[0.0, math.log(10.0 / max(float(y.var()) if y.numel() > 1 else 1.0, 1e-8))] for _, y in data]
        log_h = torch.tensor(init, dtype=self.dtype, requires_grad=True)
        opt = torch.optim.Adam([*self.net.parameters(), log_h], lr=lr)
        self.history_ = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            nll = -sum(
                blr_log_marginal_likelihood(self._phi(x), y, log_h[t, 0].exp(), log_h[t, 1].exp())
                for t, (x, y) in enumerate(data)
            )
            (nll / total).backward()
            opt.step()
            self.history_.append(float(nll.detach()) / total)
        self.log_hypers_ = log_h.detach()
        return self

    @one_thread()
    def predict(
        self,
        x: Tensor,
        y: Tensor,
        x_test: Tensor,
        fit_hyperparameters: bool = True,
        steps: int = 200,
        lr: float = 0.05,
        alpha: float | None = None,
        beta: float | None = None,
    ) -> GaussianPrediction:
        """BLR on the frozen features of the target data x (n, d), y (n,); predictive at x_test (m, d).

        The target's (α, β) start at the source tasks' geometric mean (or at the given values)
        and, if ``fit_hyperparameters``, maximise the target's marginal likelihood (Adam on
        log α, log β). ``info`` holds α, β and the target log marginal likelihood.
        """
        phi, phi_t = self.features(x), self.features(x_test)
        y = torch.as_tensor(y).to(self.dtype).reshape(-1)
        start = self.log_hypers_.mean(0) if self.log_hypers_ is not None else torch.zeros(2, dtype=self.dtype)
        if alpha is not None:
            start[0] = math.log(alpha)
        if beta is not None:
            start[1] = math.log(beta)
        log_h = start.clone().requires_grad_(fit_hyperparameters)
        if fit_hyperparameters:
            opt = torch.optim.Adam([log_h], lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                (-blr_log_marginal_likelihood(phi, y, log_h[0].exp(), log_h[1].exp())).backward()
                opt.step()
        log_h = log_h.detach()
        out = blr_predict(phi, y, phi_t, log_h[0].exp(), log_h[1].exp())
        out.info["log_marginal_likelihood"] = float(
            blr_log_marginal_likelihood(phi, y, log_h[0].exp(), log_h[1].exp())
        )
        return out


__all__ = ["GaussianPrediction", "ABLR", "blr_log_marginal_likelihood", "blr_predict", "one_thread"]
