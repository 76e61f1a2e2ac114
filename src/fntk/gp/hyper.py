r"""The GP hyperparameters (kernel scale s, noise σ², mean coefficients β, in standardised units)
and their search, the one for every solver and model:

- :func:`optimize`: the spectral and iterative solvers' (log s, log σ²) search, β profiled by GLS
  (:mod:`fntk.gp.means`), batched over k' outputs; a coarse grid picks the start;
- :func:`search`: any differentiable objective of an unconstrained vector (the composite models of
  :mod:`fntk.gp.composite`), from a few given starts.

Both polish the best start with L-BFGS (:func:`refine`) and never end below it. An optional log
hyperprior log p(θ) is added to the objective (MAP-II; :mod:`fntk.gp.priors`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fntk import persist
from fntk.linalg import polish
from fntk.validation import Callback

LOG2PI = math.log(2 * math.pi)
F64 = torch.float64


@persist.register("gp.Hyper")
@dataclass
class Hyper:
    """Hyperparameters in standardised units, one entry per output: (k',) float64 tensors.

    ``constant`` is β₀, the coefficient of the mean's column of ones; ``slope`` β₁, the
    coefficient of the standardised network output f̃ (the "scaled" mean; None otherwise)."""

    scale: Tensor
    noise: Tensor
    constant: Tensor
    slope: Tensor | None = None

    @property
    def beta(self) -> Tensor:
        """β (k', q)."""
        cols = [self.constant] + ([] if self.slope is None else [self.slope])
        return torch.stack(cols, -1)

    @classmethod
    def from_beta(cls, scale: Tensor, noise: Tensor, beta: Tensor) -> Hyper:
        # clones: a column of β is a strided view, which the saved file's checksum cannot hash
        fresh = torch.contiguous_format
        return cls(scale, noise, beta[:, 0].clone(memory_format=fresh),
                   beta[:, 1].clone(memory_format=fresh) if beta.shape[-1] > 1 else None)


#: (log s (k',), log σ² (k',), b (k',) or None to profile β out) -> (lml (k',), β (k', q))
Objective = Callable[[Tensor, Tensor, "Tensor | None"], "tuple[Tensor, Tensor]"]
#: (log s (k',), log σ² (k',)) -> log hyperprior (k',)
LogPrior = Callable[[Tensor, Tensor], Tensor]


def observe(objective: Callable[..., Any], callback: Callback | None) -> Callable[..., Any]:
    """Wrap a marginal-likelihood objective so that ``callback`` sees every evaluation.

    The callback receives ``{"step": i, "log_marginal_likelihood": (k',) tensor (detached)}``
    after evaluation i (0, 1, ...) of the hyperparameter search; whatever it raises propagates.
    """
    if callback is None:
        return objective
    step = [0]

    def wrapped(*args: Any) -> Any:
        out = objective(*args)
        callback({"step": step[0], "log_marginal_likelihood": out[0].detach()})
        step[0] += 1
        return out

    return wrapped


def refine(loss: Callable[[Tensor], Tensor], start: Tensor, max_iter: int) -> Tensor:
    """L-BFGS (strong Wolfe, :func:`fntk.linalg.polish`) on ``loss`` from ``start`` (q,); returns the
    polished point, or ``start`` when the line search failed or the polished loss is not finite or
    above the start's."""
    param = start.detach().clone().requires_grad_(True)
    if not polish(param, loss, max_iter):
        return start.detach().clone()
    with torch.no_grad():
        end, begin = loss(param.detach()), loss(start.detach())
    if not bool(torch.isfinite(end)) or bool(end > begin):
        return start.detach().clone()
    return param.detach()


def search(
    objective: Callable[[Tensor], Tensor], starts: Tensor, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """Maximise ``objective`` (a 0-d tensor of an unconstrained vector (q,), differentiable) from the
    best of ``starts`` (S, q): (maximiser (q,), its value). Non-finite values count as −∞."""
    with torch.no_grad():
        vals = torch.stack([torch.nan_to_num(objective(s), nan=-math.inf) for s in starts])
    best = int(vals.argmax())
    if not bool(torch.isfinite(vals[best])):
        raise ValueError("the hyperparameter search found no start with a finite marginal likelihood")
    x = refine(lambda u: -objective(u), starts[best], max_iter)
    with torch.no_grad():
        return x, objective(x)


def optimize(
    objective: Objective,
    init: Hyper,
    learn: frozenset[str],
    noise_floor: float = 1e-6,
    max_iter: int = 200,
    log_prior: LogPrior | None = None,
) -> Hyper:
    """Maximise the log marginal likelihood (plus ``log_prior`` when given) over log s,
    log(σ² − floor) and β (profiled exactly by GLS).

    Hyperparameters not in ``learn`` keep their ``init`` values. A coarse grid over the learned
    log-scales picks the start (cheap: each evaluation is O(n), O(p) or O(R)), then L-BFGS with a
    strong-Wolfe line search polishes it. The sum over outputs is separable, so the k' problems are
    solved together.
    """
    k = init.scale.shape[0]
    learn_s, learn_n = "scale" in learn, "noise" in learn
    b_fixed = None if "constant" in learn else init.constant

    def hyper(ls: Tensor, lu: Tensor) -> tuple[Tensor, Tensor]:
        log_s = ls if learn_s else init.scale.log()
        log_noise = torch.log(noise_floor + lu.exp()) if learn_n else init.noise.log()
        return log_s, log_noise

    def value(ls: Tensor, lu: Tensor) -> tuple[Tensor, Tensor]:
        log_s, log_noise = hyper(ls, lu)
        val, b = objective(log_s, log_noise, b_fixed)
        return (val if log_prior is None else val + log_prior(log_s, log_noise)), b

    ls0 = init.scale.log()
    lu0 = (init.noise - noise_floor).clamp_min(noise_floor * 1e-3).log()
    if not (learn_s or learn_n):
        with torch.no_grad():
            _, b = value(ls0, lu0)
        return Hyper.from_beta(init.scale, init.noise, b.detach())
    s_grid = [float(d) for d in torch.linspace(-6, 6, 13)] if learn_s else [0.0]
    n_grid = [float(v) for v in torch.linspace(math.log(1e-5), 0.0, 11)] if learn_n else [None]
    best = torch.full((k,), -math.inf, dtype=F64, device=init.scale.device)
    start_s, start_u = ls0.clone(), lu0.clone()
    with torch.no_grad():
        for ds in s_grid:
            for lu in n_grid:
                ls = ls0 + ds
                u = lu0 if lu is None else torch.full_like(lu0, lu)
                val = torch.nan_to_num(value(ls, u)[0], nan=-math.inf)
                better = val > best
                best = torch.where(better, val, best)
                start_s = torch.where(better, ls, start_s)
                start_u = torch.where(better, u, start_u)
    ls_opt, lu_opt = start_s.clone(), start_u.clone()
    for j in range(k):  # one L-BFGS per output: separate convergence tests and line searches

        def loss(prm: Tensor, j=j) -> Tensor:
            ls = torch.cat([ls_opt[:j], prm[:1], ls_opt[j + 1 :]])
            lu = torch.cat([lu_opt[:j], prm[1:], lu_opt[j + 1 :]])
            return -value(ls, lu)[0][j]

        ls_opt[j], lu_opt[j] = refine(loss, torch.stack([start_s[j], start_u[j]]), max_iter)
    with torch.no_grad():
        val, _ = value(ls_opt, lu_opt)
        bad = ~torch.isfinite(val) | (val < best)  # never end worse than the grid's best point
        ls, lu = torch.where(bad, start_s, ls_opt), torch.where(bad, start_u, lu_opt)
        _, b = value(ls, lu)
        log_s, log_noise = hyper(ls, lu)
    return Hyper.from_beta(log_s.exp(), log_noise.exp(), b.detach())


__all__ = ["Hyper", "Objective", "LogPrior", "observe", "optimize", "search", "refine", "LOG2PI", "F64"]
