r"""The composite NTK-GP in function space: several kernel terms and input-dependent noise.

For one output and standardised residuals z (n,) (see :mod:`fntk.gp.models` for the model and
:mod:`fntk.gp.means` for the mean), with hyperparameters θ:

    K(θ) = Σ_l s_l G_l + s_in · (ρρᵀ) ∘ k_in(U, U; ℓ)      (n × n)
    D(θ) = σ² + c·v                                       (n,), v = σ²_src(X)/σ_y²
    M(θ) = K(θ) + diag(D(θ))
    log p(z | θ, β) = −½ (z − Hβ)ᵀM⁻¹(z − Hβ) − ½ log|M| − (n/2) log 2π

G_l are the per-layer NTK blocks (or the whole NTK as one block), k_in the input kernel on the
flattened inputs U, ρ = σ_src(X)/σ_y when the input kernel's amplitude follows the source net
(else 1), all standardised. No single factorisation serves every θ, so each evaluation is one
Cholesky M = LLᵀ (O(n³/3)) with autograd gradients; β is profiled by GLS from the triangular
solves L⁻¹z, L⁻¹H. The search (:func:`fntk.gp.hyper.search`) runs over the unconstrained vector
u = (log s_1..s_L, log s_in, log ℓ, log c, log(σ² − floor)).

Prediction at x* (m points): k* = K(X, x*), the posterior mean k*ᵀα with α = M⁻¹(z − Hβ̂), the
latent variance k** − ‖L⁻¹k*‖², and the predictive noise σ² + c·v(x*).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from fntk import persist
from fntk.errors import NumericalWarning
from fntk.gp import kernels, priors
from fntk.gp.dense import Factor
from fntk.gp.hyper import F64, LOG2PI, Hyper, search
from fntk.gp.means import gls
from fntk.gp.models import GPModel
from fntk.gp.network import (
    kernel_diagonal,
    layer_diagonals,
    layer_kernels,
    layer_linearizations,
    source_variance,
)
from fntk.linalg import safe_cholesky
from fntk.linearize import Linearized
from fntk.ntk import cache

NOISE_FLOOR = 1e-6
MAX_ITER = 100
U_MAX = 40.0  # |log θ| bound inside the covariance: e^40 ≈ 2e17


def _factor(M: Tensor) -> Tensor:
    with warnings.catch_warnings():  # a jittered step inside the search is not the final fit
        warnings.simplefilter("ignore", NumericalWarning)
        return safe_cholesky(M, "the composite GP covariance")


class ProfiledLogLikelihood(torch.autograd.Function):
    """max_β log N(z | Hβ, M) (0-d) and β̂ of a covariance M (n, n), differentiable in M.

    Backward: ∂/∂M = ½(ααᵀ − M⁻¹), α = M⁻¹(z − Hβ̂) (at the profiled β̂ the partial derivative is the
    total one), from one Cholesky inverse: about n³ flops against ~3n³ for autograd through the
    Cholesky factorisation."""

    @staticmethod
    def forward(ctx, M: Tensor, z: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
        L = _factor(M)
        W = torch.linalg.solve_triangular(L, torch.cat([z[:, None], H], -1), upper=False)
        wz, WH = W[:, 0], W[:, 1:]
        quad, beta = gls((wz * wz).sum()[None], (WH.T @ wz)[None], (WH.T @ WH)[None])
        value = -0.5 * (quad[0] + 2 * L.diagonal().log().sum() + M.shape[0] * LOG2PI)
        ctx.save_for_backward(L, z, H, beta[0])
        ctx.mark_non_differentiable(beta)
        return value, beta[0]

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_beta: Tensor) -> tuple[Tensor, None, None]:
        L, z, H, beta = ctx.saved_tensors
        alpha = torch.cholesky_solve((z - H @ beta)[:, None], L)[:, 0]
        dM = 0.5 * grad * (alpha[:, None] * alpha[None, :] - torch.cholesky_inverse(L))
        return dM, None, None


@persist.register("gp.DenseComposite")
class DenseComposite:
    """One output, function space, the kernel and noise of a composite :class:`GPModel`."""

    space = "function"

    def __init__(self, lin: Linearized, x: Tensor, output: int, z: Tensor, H: Tensor, model: GPModel,
                 G: Tensor | None, sd: Tensor, variance: tuple[int, str] | None, method: str = "auto"):
        """z (1, n), H (1, n, q), G the output's NTK (1, n, n) or None to compute it, sd (1,) σ_y,
        ``variance`` (output index, link) of the source variance when the model uses it."""
        self.lin, self.x, self.outputs, self.method = lin, x, [output], method
        self.model, self.z, self.H, self.n = model, z, H, x.shape[0]
        self.sd, self.variance = sd, variance
        self._layers = layer_linearizations(lin) if model.layer_scales else None
        if model.layer_scales:
            self.G = layer_kernels(self._layers, x, None, output, method)  # (L, n, n)
        else:
            self.G = (G if G is not None else cache.output_kernels(lin, x, None, [output], method)).to(F64)
        self.U = kernels.features(x) if model.input_kernel else None
        shared = self.U is not None and kernels.num_lengthscales(self.U.shape[1]) == 1
        self._D2 = kernels.sq_dist(self.U, self.U) if shared else None  # r² = D2/ℓ² for every ℓ
        self.v = self._variance(x) if variance is not None else None  # (n,) standardised
        L, m = self.G.shape[0], 0 if self.U is None else kernels.num_lengthscales(self.U.shape[1])
        self.terms = L
        sizes = {"log_scales": L, "log_input_scale": int(self.U is not None), "log_lengthscales": m,
                 "log_multiplier": int(model.source_noise), "log_noise": 1}
        self.layout, at = {}, 0
        for name, size in sizes.items():
            self.layout[name] = (at, at + size)
            at += size
        self.q = at
        self.u: Tensor | None = None
        self.h: Hyper | None = None

    # ------------------------------------------------------------------ persistence
    def __fntk_state__(self) -> dict:
        """Everything but the per-layer Linearized objects (rebuilt from ``lin`` on load)."""
        return {k: v for k, v in vars(self).items() if k != "_layers"}

    def __fntk_restore__(self) -> None:
        self._layers = layer_linearizations(self.lin) if self.model.layer_scales else None

    # ------------------------------------------------------------------ pieces
    def _variance(self, xs: Tensor) -> Tensor:
        index, link = self.variance
        return source_variance(self.lin.forward(xs), index, link) / self.sd[0] ** 2

    def part(self, u: Tensor, name: str) -> Tensor:
        a, b = self.layout[name]
        return u[a:b]

    def prior_scale(self) -> Tensor:
        """Mean prior variance of the NTK, diag(Σ_l G_l)/n (1,)."""
        return self.G.sum(0).diagonal().mean().reshape(1)

    def point_bytes(self) -> int:
        """Working bytes of :meth:`predict` per test point (cross kernels per term, whitened copy)."""
        return 8 * (4 + self.terms) * self.n

    def _amplitude(self, v: Tensor | None) -> Tensor | float:
        return v.sqrt() if self.model.source_amplitude else 1.0

    def covariance(self, u: Tensor) -> Tensor:
        """M(θ) (n × n) at the unconstrained u (differentiable; u is clamped to ±U_MAX so that a
        long line-search step cannot overflow exp)."""
        u = u.clamp(-U_MAX, U_MAX)
        M = torch.einsum("l,lij->ij", self.part(u, "log_scales").exp(), self.G)
        if self.U is not None:
            rho = self._amplitude(self.v)
            ls = self.part(u, "log_lengthscales")
            Kin = kernels.input_kernel(self.model.input_kernel, self.U, self.U, ls, self._D2)
            if self.model.source_amplitude:
                Kin = Kin * (rho[:, None] * rho[None, :])
            M = M + self.part(u, "log_input_scale").exp() * Kin
        return M + torch.diag(self.noise_vector(u))

    def noise_vector(self, u: Tensor) -> Tensor:
        """D(θ) (n,)."""
        noise = NOISE_FLOOR + self.part(u, "log_noise").exp()
        d = noise.expand(self.n)
        if self.model.source_noise:
            d = d + self.part(u, "log_multiplier").exp() * self.v
        return d

    def log_likelihood(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(profiled log N(z | Hβ̂, M(θ)) (0-d), β̂ (q_β,)), differentiable in u."""
        return ProfiledLogLikelihood.apply(self.covariance(u), self.z[0], self.H[0])

    def log_prior(self, u: Tensor, scale0: float, noise0: tuple[float, float], ls0: Tensor | None) -> Tensor:
        """log p(u) (:mod:`fntk.gp.priors`)."""
        P, ln = priors, math.log
        lp = P.log_normal(self.part(u, "log_scales"), u.new_full((self.terms,), ln(scale0)), P.SCALE_WIDTH)
        if self.U is not None:
            center = u.new_full((1,), ln(P.INPUT_SCALE_CENTER))
            lp = lp + P.log_normal(self.part(u, "log_input_scale"), center, P.SCALE_WIDTH)
            lp = lp + P.log_normal(self.part(u, "log_lengthscales"), ls0.log(), P.LENGTHSCALE_WIDTH)
        if self.model.source_noise:
            lp = lp + P.log_normal(self.part(u, "log_multiplier"), u.new_zeros(1), P.MULTIPLIER_WIDTH)
        log_noise = torch.log(NOISE_FLOOR + self.part(u, "log_noise").exp())
        return lp + P.log_normal(log_noise, u.new_full((1,), ln(noise0[0])), noise0[1])

    # ------------------------------------------------------------------ fit
    def starts(self, scale: float, noise: float) -> Tensor:
        """A few starts (S, q) around the plain NTK-GP's (s, σ²): the input kernel and the source
        noise taking a small or a large share of the residual variance."""
        ls0 = kernels.median_lengthscales(self.U) if self.U is not None else None
        rows = []
        for f_ntk, s_in, f_ls, c in ((1.0, 0.05, 1.0, 0.3), (0.3, 0.5, 1.0, 1.0), (0.1, 1.0, 0.5, 1.0),
                                     (1.0, 0.3, 2.0, 0.1)):
            u = torch.zeros(self.q, dtype=F64, device=self.z.device)
            self._put(u, "log_scales", math.log(scale * f_ntk))
            if ls0 is not None:
                self._put(u, "log_input_scale", math.log(s_in))
                a, b = self.layout["log_lengthscales"]
                u[a:b] = (ls0 * f_ls).log()
            if self.model.source_noise:
                self._put(u, "log_multiplier", math.log(c))
            share = 0.5 if (ls0 is not None or self.model.source_noise) else 1.0
            self._put(u, "log_noise", math.log(max(noise * share - NOISE_FLOOR, NOISE_FLOOR * 1e-3)))
            rows.append(u)
        return torch.stack(rows)

    def _put(self, u: Tensor, name: str, value: float) -> None:
        a, b = self.layout[name]
        u[a:b] = value

    def fit(self, scale: float, noise: float, hyperprior: bool, noise0: tuple[float, float],
            callback=None) -> tuple[Tensor, float]:
        """Learn u from the starts around the plain NTK-GP's (s, σ²), maximising the profiled log
        marginal likelihood (plus the log hyperprior with ``hyperprior``); returns (û, the
        maximised objective). ``callback(value)`` sees every evaluation."""
        ls0 = kernels.median_lengthscales(self.U) if self.U is not None else None
        self.prior_args = (float(1.0 / self.prior_scale().clamp_min(1e-300)), noise0, ls0)

        def objective(u: Tensor) -> Tensor:
            try:
                val = self.log_likelihood(u)[0]
            except ValueError:  # not positive definite even with jitter: −∞, a flat gradient
                return u.sum() * 0 - math.inf
            if callback is not None:
                callback(val.detach().reshape(1))
            return val + self.log_prior(u, *self.prior_args) if hyperprior else val

        u, val = search(objective, self.starts(scale, noise), MAX_ITER)
        return u, float(val)

    def condition(self, u: Tensor) -> None:
        """Factor M(û) and α = M⁻¹(z − Hβ̂)."""
        with torch.no_grad():
            L = _factor(self.covariance(u))
        W = torch.linalg.solve_triangular(L, torch.cat([self.z[0][:, None], self.H[0]], -1), upper=False)
        wz, WH = W[:, 0], W[:, 1:]
        _, beta = gls((wz * wz).sum()[None], (WH.T @ wz)[None], (WH.T @ WH)[None])
        self.u = u.detach()
        self.factor = Factor(L=L[None])
        self.resid = self.z - (self.H[0] @ beta[0])[None]
        self.alpha = self.factor.solve(self.resid[..., None])[..., 0]
        noise = NOISE_FLOOR + self.part(self.u, "log_noise").exp()
        self.h = Hyper.from_beta(self.part(self.u, "log_scales").exp().sum().reshape(1), noise, beta)

    def release(self) -> None:
        """Drop the training kernels once the model is scored (predictions form their cross kernels;
        a saved adapter does not store n × n matrices beyond the Cholesky factor)."""
        self.G, self._D2 = None, None

    def lml(self) -> Tensor:
        quad = (self.resid * self.alpha).sum(-1)
        return -0.5 * (quad + self.factor.logdet() + self.n * LOG2PI)

    # ------------------------------------------------------------------ predict
    def _cross(self, xs: Tensor, full_cov: bool) -> tuple[Tensor, Tensor]:
        """(K(X, x*) (n, m), K(x*, x*) (m, m) or its diagonal (m,))."""
        u, out = self.u, self.outputs[0]
        s = self.part(u, "log_scales").exp()
        if self._layers is not None:
            Kx = torch.einsum("l,lij->ij", s, layer_kernels(self._layers, self.x, xs, out, self.method))
            Kss = (torch.einsum("l,lij->ij", s, layer_kernels(self._layers, xs, None, out, self.method))
                   if full_cov else s @ layer_diagonals(self._layers, xs, out))
        else:
            Kx = s * cache.output_kernels(self.lin, self.x, xs, self.outputs, self.method)[0].to(F64)
            Kss = s * (cache.output_kernels(self.lin, xs, None, self.outputs, self.method)[0].to(F64)
                       if full_cov else kernel_diagonal(self.lin, xs, self.outputs)[0].to(F64))
        if self.U is not None:
            Us, kind = kernels.features(xs), self.model.input_kernel
            ls, s_in = self.part(u, "log_lengthscales"), self.part(u, "log_input_scale").exp()
            Kin_x = kernels.input_kernel(kind, self.U, Us, ls)
            Kin_s = kernels.input_kernel(kind, Us, Us, ls) if full_cov else torch.ones(Us.shape[0], dtype=F64)
            if self.model.source_amplitude:
                r, rs = self._amplitude(self.v), self._amplitude(self._variance(xs))
                Kin_x = Kin_x * (r[:, None] * rs[None, :])
                Kin_s = Kin_s * (rs[:, None] * rs[None, :] if full_cov else rs * rs)
            Kx, Kss = Kx + s_in * Kin_x, Kss + s_in * Kin_s.to(Kss.device)
        return Kx, Kss

    def predict(self, xs: Tensor, full_cov: bool) -> tuple[Tensor, Tensor]:
        """Latent mean (1, m) (without the mean's Hβ̂) and variance (1, m) or covariance (1, m, m)."""
        with torch.no_grad():
            Kx, Kss = self._cross(xs, full_cov)
            mean = (Kx.T @ self.alpha[0])[None]
            W = self.factor.whiten(Kx[None])
            if full_cov:
                return mean, Kss[None] - W.mT @ W
            return mean, Kss[None] - W.square().sum(-2)

    def noise_at(self, xs: Tensor) -> Tensor:
        """Predictive noise variance σ² + c·v(x*) (1, m), standardised."""
        noise = NOISE_FLOOR + self.part(self.u, "log_noise").exp()
        if not self.model.source_noise:
            return noise.expand(xs.shape[0])[None]
        return (noise + self.part(self.u, "log_multiplier").exp() * self._variance(xs))[None]

    def hyperparameters(self, sd: Tensor) -> dict[str, float | list[float]]:
        """The learned values in the data's units: the kernel is Σ_l scale_l·J_lJ_lᵀ +
        input_scale·k_in (·σ_src(x)σ_src(x′) with @src), the noise noise + noise_multiplier·σ²_src(x)."""
        u, var = self.u, float(sd[0]) ** 2
        noise = float(NOISE_FLOOR + self.part(u, "log_noise").exp()) * var
        out: dict[str, float | list[float]] = {"noise": noise}
        scales = (self.part(u, "log_scales").exp() * var).tolist()
        out["scale" if len(scales) == 1 else "layer_scales"] = scales[0] if len(scales) == 1 else scales
        if self.U is not None:  # with @src the data-units kernel is s_in·σ_src(x)σ_src(x′)·k_in
            amp = 1.0 if self.model.source_amplitude else var
            out["input_scale"] = float(self.part(u, "log_input_scale").exp()) * amp
            out["lengthscales"] = self.part(u, "log_lengthscales").exp().tolist()
        if self.model.source_noise:
            out["noise_multiplier"] = float(self.part(u, "log_multiplier").exp())
        return out


__all__ = ["DenseComposite"]
