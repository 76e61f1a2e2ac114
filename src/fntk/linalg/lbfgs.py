r"""L-BFGS, the one module: our own for convex objectives to a gradient-norm tolerance
(:func:`minimize`), and the drivers of ``torch.optim.LBFGS`` (strong Wolfe) for smooth objectives
of a few parameter tensors: iteration by iteration with a callback (:func:`run_lbfgs`, the VI
ELBO) or in one call (:func:`polish`, the GP hyperparameters).

:func:`minimize` is hand-written because ``torch.optim.LBFGS`` cannot reach the tolerances the
MAP of a linearized classifier is asked for: its strong-Wolfe line search tests sufficient decrease
on function values, and near the optimum the decrease ~‖∇Ψ‖²/L falls below the float64 rounding of Ψ itself
(Ψ ~ 60 stalls at ‖∇Ψ‖ ~ 2e-6 on a 60-point problem). Here the line search also brackets the
minimiser along the direction by the *directional derivative* φ'(t) = ∇Ψ(w + t d)·d, which stays
accurate to the gradient's precision; on a convex Ψ, φ' is non-decreasing, so secant steps on φ'
inside a bracket converge. The Armijo test on values is kept where values still resolve it
(differences above 1e-12·|Ψ|).

Standard two-loop recursion (Nocedal & Wright, Algorithm 7.4) with the initial scaling sᵀy/yᵀy,
memory ``history``; pairs with sᵀy ≤ 0 are skipped; a direction that is not a descent direction
resets the memory to steepest descent.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

C1, C2 = 1e-4, 0.9


def _direction(g: Tensor, mem: deque) -> Tensor:
    q = -g
    alphas = []
    for s, y, rho in reversed(mem):
        a = rho * float(s @ q)
        alphas.append(a)
        q = q - a * y
    if mem:
        s, y, _ = mem[-1]
        q = q * (float(s @ y) / float(y @ y))
    for (s, y, rho), a in zip(mem, reversed(alphas)):
        q = q + (a - rho * float(y @ q)) * s
    return q


def _line_search(
    fg: Callable[[Tensor], tuple[float, Tensor]], w: Tensor, f0: float, d: Tensor, a0: float, t: float
) -> tuple[float, float, Tensor] | None:
    """A step t along d with |φ'(t)| ≤ C2|φ'(0)| and φ(t) ≤ φ(0) + C1 t φ'(0) (up to rounding):
    (t, Ψ, ∇Ψ) at w + t d, or None after 40 evaluations."""
    lo, d_lo, hi, d_hi = 0.0, a0, math.inf, math.nan
    slack = 1e-12 * max(1.0, abs(f0))
    for _ in range(40):
        f, g = fg(w + t * d)
        dt = float(g @ d)
        if not (math.isfinite(f) and math.isfinite(dt)) or f > f0 + C1 * t * a0 + slack:
            hi, d_hi = t, (dt if math.isfinite(dt) else math.nan)
        elif abs(dt) <= C2 * abs(a0):
            return t, f, g
        elif dt > 0:
            hi, d_hi = t, dt
        else:
            lo, d_lo = t, dt
        if math.isinf(hi):
            t = 4 * t
            continue
        # secant on φ' (exact for a quadratic), kept well inside the bracket; bisection otherwise
        width = hi - lo
        guess = lo - d_lo * width / (d_hi - d_lo) if math.isfinite(d_hi) and d_hi > d_lo else math.nan
        inside = math.isfinite(guess) and lo + 0.05 * width < guess < hi - 0.05 * width
        t = guess if inside else lo + 0.5 * width
    return None


def minimize(
    fg: Callable[[Tensor], tuple[float, Tensor]],
    w0: Tensor,
    tol: float,
    max_iter: int,
    history: int = 20,
    notify: Callable[[int, float, float], None] | None = None,
) -> tuple[Tensor, list[tuple[float, float]], bool]:
    """Minimise Ψ from w0 (p,) until ‖∇Ψ‖ ≤ tol; ``fg(w) -> (Ψ(w), ∇Ψ(w))``.

    Returns (w, [(Ψ, ‖∇Ψ‖) per iteration], converged). ``notify(step, Ψ, ‖∇Ψ‖)`` is called at each
    iterate. Stops unconverged after ``max_iter`` iterations or when no step along the steepest
    descent direction satisfies the line search (stationary to the precision of ∇Ψ).
    """
    w = w0.clone()
    f, g = fg(w)
    mem: deque = deque(maxlen=history)
    hist: list[tuple[float, float]] = []
    for it in range(max_iter + 1):
        gn = float(g.norm())
        hist.append((f, gn))
        if notify is not None:
            notify(it, f, gn)
        if gn <= tol:
            return w, hist, True
        if it == max_iter or not math.isfinite(f):
            break
        d = _direction(g, mem)
        a0 = float(g @ d)
        if not a0 < 0:
            mem.clear()
            d, a0 = -g, -gn * gn
        t0 = 1.0 if mem else min(1.0, 1.0 / gn)  # steepest descent: a unit-length first step
        step = _line_search(fg, w, f, d, a0, t0)
        if step is None and mem:  # the quasi-Newton model misled the search: restart
            mem.clear()
            d, a0 = -g, -gn * gn
            step = _line_search(fg, w, f, d, a0, min(1.0, 1.0 / gn))
        if step is None:
            break
        t, f_new, g_new = step
        s, y = t * d, g_new - g
        sy = float(s @ y)
        if sy > 1e-16 * float(s @ s) ** 0.5 * float(y @ y) ** 0.5:
            mem.append((s, y, 1.0 / sy))
        w, f, g = w + s, f_new, g_new
    return w, hist, False


def polish(param: Tensor, loss: Callable[[Tensor], Tensor], max_iter: int = 200) -> bool:
    """Minimise ``loss(param)`` over the leaf tensor ``param`` in place by one call of
    ``torch.optim.LBFGS`` (strong Wolfe, ≤ ``max_iter`` iterations, gradient tolerance 1e-9,
    change tolerance 1e-12). Returns False when the line search failed (``param`` then holds
    torch's last iterate; callers keep their own best point)."""
    opt = torch.optim.LBFGS(
        [param], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss(param)
        value.backward()
        return value

    try:
        opt.step(closure)
    except RuntimeError:  # a failed line search
        return False
    return True


def run_lbfgs(
    params: list[Tensor],
    evaluate: Callable[[bool], Tensor],
    max_iter: int,
    tol: float,
    callback: Callable[[dict], None] | None = None,
) -> tuple[list[float], bool]:
    """Minimise a deterministic objective by L-BFGS (strong Wolfe), one iteration per step; stop
    when it changes by less than tol·(1 + |value|). ``evaluate(need_grad)`` returns the objective
    (a 0-d tensor); with ``need_grad`` it also accumulates its gradient into the params' ``.grad``
    (so it may backpropagate chunk by chunk). Returns (−objective per iteration, converged);
    ``callback`` gets ``{"stage": "vi", "step", "objective", "elbo"}`` after every iteration."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=1,
        max_eval=40,  # line-search evaluations per step (the default max_iter·5/4 would allow none)
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure():
        opt.zero_grad()
        return evaluate(True)

    history = [-float(evaluate(False))]
    converged = False
    for it in range(max_iter):
        opt.step(closure)
        history.append(-float(evaluate(False)))
        if callback is not None:
            callback({"stage": "vi", "step": it + 1, "objective": -history[-1], "elbo": history[-1]})
        if abs(history[-1] - history[-2]) <= tol * (1 + abs(history[-1])):
            converged = True
            break
    return history, converged


def autograd_evaluate(objective: Callable[[], Tensor]) -> Callable[[bool], Tensor]:
    """Adapt a differentiable objective() to :func:`run_lbfgs`'s ``evaluate(need_grad)``."""

    def evaluate(need_grad: bool) -> Tensor:
        if not need_grad:
            with torch.no_grad():
                return objective()
        loss = objective()
        loss.backward()
        return loss.detach()

    return evaluate


__all__ = ["minimize", "polish", "run_lbfgs", "autograd_evaluate"]
