"""A dense float64 reference for linearized classification: explicit Jacobians from tests/reference.py
(plain autograd), its own Newton iterations and covariance algebra; nothing of fntk's solvers."""

from __future__ import annotations

import math

import torch
from torch import nn

from reference import dense_jacobian, eval_forward

DT = torch.float64


def _data(n=24, d=3, k=3, seed=0, model=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    if model is None:
        y = torch.randint(0, max(k, 2), (n,), generator=g)
    else:  # labels that mostly agree with a rotated version of the model: a "new task"
        with torch.no_grad():
            logits = model(x @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT)).Q)
        y = torch.distributions.Categorical(logits=2 * logits).sample()
    return x, y


def _probs(f):
    if f.shape[-1] == 1:
        s = torch.sigmoid(f)
        return torch.cat([1 - s, s], -1)
    return torch.softmax(f, -1)


def _grad_lik(f, y, k):
    """∇_f Σ nll for softmax (k ≥ 2) or Bernoulli (k = 1): (n, k)."""
    if k == 1:
        return torch.sigmoid(f) - y.to(DT)[:, None]
    return torch.softmax(f, -1) - nn.functional.one_hot(y, k).to(DT)


def _hess_lik(f, k):
    """Output Hessians (n, k, k)."""
    if k == 1:
        s = torch.sigmoid(f)
        return (s * (1 - s))[:, :, None]
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


class DenseReference:
    """Dense float64 MAP / Laplace for the linear model f0 + J(w − θ̂) with prior N(μ₀, λ⁻¹I)."""

    def __init__(self, model, x, y, lam, mu0_zero=False, names=None):
        self.model, self.names = model, names
        self.J = dense_jacobian(model, x, names)  # (n, k, p)
        self.f0 = eval_forward(model, x)
        params = dict(model.named_parameters())
        sel = names if names is not None else [n for n, p in params.items() if p.requires_grad]
        self.theta = torch.cat([params[n].detach().reshape(-1) for n in sel])
        self.mu0 = torch.zeros_like(self.theta) if mu0_zero else self.theta.clone()
        self.y, self.lam, self.k = y, lam, self.J.shape[1]
        self.w = self.theta.clone()
        self._newton()

    def logits(self, w):
        return self.f0 + torch.einsum("nkp,p->nk", self.J, w - self.theta)

    def objective(self, w):
        f = self.logits(w)
        if self.k == 1:
            nll = (nn.functional.softplus(f[:, 0]) - self.y.to(DT) * f[:, 0]).sum()
        else:
            nll = -torch.log_softmax(f, -1).gather(1, self.y[:, None]).sum()
        return nll + 0.5 * self.lam * (w - self.mu0).square().sum()

    def gradient(self, w):
        f = self.logits(w)
        return torch.einsum("nkp,nk->p", self.J, _grad_lik(f, self.y, self.k)) + self.lam * (w - self.mu0)

    def precision(self, w):
        H = _hess_lik(self.logits(w), self.k)
        P = torch.einsum("nkp,nkl,nlq->pq", self.J, H, self.J)
        return P + self.lam * torch.eye(P.shape[0], dtype=DT)

    def _newton(self):
        for _ in range(200):
            g = self.gradient(self.w)
            if g.norm() < 1e-12:
                break
            d = -torch.linalg.solve(self.precision(self.w), g)
            t, f0 = 1.0, self.objective(self.w)
            while self.objective(self.w + t * d) > f0 + 1e-4 * t * (g @ d) and t > 1e-10:
                t /= 2
            self.w = self.w + t * d
        self.P = self.precision(self.w)
        self.cov = torch.linalg.inv(self.P)

    def predictive(self, xs):
        Js = dense_jacobian(self.model, xs, self.names)
        mean = eval_forward(self.model, xs) + torch.einsum("nkp,p->nk", Js, self.w - self.theta)
        cov = torch.einsum("nkp,pq,nlq->nkl", Js, self.cov, Js)
        return mean, cov

    def log_evidence(self):
        p = self.theta.shape[0]
        return float(-self.objective(self.w) - 0.5 * torch.logdet(self.P) + 0.5 * p * math.log(self.lam))
