"""The prior precision λ of the linearized classifier by the Laplace evidence (see :mod:`fntk.classify`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fntk import persist
from fntk.classify.function_space import FunctionSpace
from fntk.classify.objective import FitInfo, SlopeTerms
from fntk.classify.weight_space import WeightSpace


@persist.register("classify.MarglikInfo")
@dataclass
class MarglikInfo:
    """The λ iterations: (λ, log evidence, d log Z / d log λ) per step, and whether λ settled."""

    history: list = field(default_factory=list)
    converged: bool = False


#: the range of the initial λ (see :func:`initial_precision`)
LAM0_RANGE = (1e-3, 1e4)


def initial_precision(backend) -> float:
    """p / ‖θ̂‖², the precision of an isotropic Gaussian with the source weights' second moment,
    clamped to LAM0_RANGE (1 when θ̂ = 0): the start of the search. Measured on the digit
    transfer (last layer, m = 100 / 500), with a secant search: 5 / 6 evidence evaluations
    against 7 / 8 from λ = 1 (4 / 4 with :func:`model_step`)."""
    theta = backend.lin.theta.double()
    sq = float(theta.square().sum())
    if not (sq > 0 and math.isfinite(sq)):
        return 1.0
    return min(max(theta.numel() / sq, LAM0_RANGE[0]), LAM0_RANGE[1])


def _piece(r0: float, a: float, r1: float, b: float):
    """ρ ↦ the piece through (r0, a) and (r1, b): a power of λ = e^ρ when both are positive, else a line."""
    if a > 0 and b > 0:
        k = (math.log(b) - math.log(a)) / (r1 - r0)
        return lambda r: b * math.exp(min(k * (r - r1), 700.0))
    s = (b - a) / (r1 - r0)
    return lambda r: b + s * (r - r1)


def model_step(p0: tuple[float, SlopeTerms], p1: tuple[float, SlopeTerms], max_step: float) -> float | None:
    """The zero of the slope model through the last two evaluations (ρ0, terms0), (ρ1, terms1),
    searched uphill from ρ1 (the sign of D(ρ1)) within ``max_step``; None when there is none.

    The model takes each piece of 2D = γ − λ‖w* − μ₀‖² − λT as a power of λ through its two values
    (a line in ρ where a piece is not positive at both): on the digit transfer (last layer, m = 100
    / 500) its zero from the first two evaluations lies within 1% of the maximum, where a secant on
    D overshoots by a factor 1.3-1.6; the search then needs 4 / 4 evaluations instead of 5 / 6."""
    (r0, t0), (r1, t1) = p0, p1
    if r1 == r0:
        return None
    g = _piece(r0, t0.gamma, r1, t1.gamma)
    q = _piece(r0, t0.lam_sq, r1, t1.lam_sq)
    t = _piece(r0, t0.lam_t, r1, t1.lam_t)

    def model(r: float) -> float:
        return g(r) - q(r) - t(r)

    sign = math.copysign(1.0, t1.slope)
    lo, h = 0.0, min(1e-3, max_step)
    while model(r1 + sign * h) * sign > 0:  # the first sign change uphill, then bisection
        if h >= max_step:
            return None
        lo, h = h, min(2 * h, max_step)
    for _ in range(60):
        mid = 0.5 * (lo + h)
        lo, h = (mid, h) if model(r1 + sign * mid) * sign > 0 else (lo, mid)
    return r1 + sign * 0.5 * (lo + h)


def optimize_prior_precision(
    backend: FunctionSpace | WeightSpace,
    tol: float,
    max_iter: int,
    lam0: float | None = None,
    rtol: float = 1e-3,
    slope_tol: float = 1e-6,
    max_steps: int = 40,
    max_step: float = 4.0,
    bounds: tuple[float, float] = (1e-8, 1e8),
) -> tuple[float, FitInfo, MarglikInfo]:
    r"""λ maximising the Laplace evidence log Z(λ) = −Ψ(w*) − ½ log det(P/λ), P = G(f*) + λI.

    Its exact slope in ρ = log λ is (implicit differentiation, dw*/dλ = −P⁻¹(w* − μ₀))

        D(ρ) = ½[γ − λ‖w* − μ₀‖² − λ Σ_i tr(S_i DH_i[J_i dw*/dλ])],  γ = tr(G P⁻¹),  S = J P⁻¹ Jᵀ;

    dropping the last term (the change of H with w*) gives MacKay's fixed point λ = γ/‖w* − μ₀‖²,
    which is only near the maximum. We solve D = 0 in ρ: first a MacKay-type step (always uphill),
    then the zero of a model of D through the last two evaluations (:func:`model_step`), or secant
    steps on D when the model has no zero uphill (doubling the step while D shrinks slowly); once D
    has changed sign every step stays inside the bracket (bisection otherwise); |Δρ| ≤ ``max_step``,
    each step refitting the MAP warm-started, until |D| ≤ ``slope_tol`` or |Δρ| < ``rtol`` (λ may
    end at a bound when the evidence is monotone, e.g. λ → ∞ when the source network already
    explains the data). The search starts at ``lam0`` (default :func:`initial_precision`). Returns
    (λ, the MAP fit at λ, the history)."""
    if lam0 is None:
        lam0 = initial_precision(backend)
    lo_b, hi_b = math.log(bounds[0]), math.log(bounds[1])
    rho, ml = math.log(lam0), MarglikInfo()
    info = backend.fit(math.exp(rho), tol, max_iter)
    terms: list[tuple[float, SlopeTerms]] = []  # (ρ, the slope's pieces) per evaluation
    prev_step = 0.0
    for _ in range(max_steps):
        lam = math.exp(rho)
        st = backend.slope_terms()
        D = st.slope
        ml.history.append((lam, backend.log_evidence(), D))
        terms.append((rho, st))
        if abs(D) <= slope_tol:  # log Z changes by < slope_tol per e-fold of λ
            ml.converged = True
            break
        # MacKay-type step: the zero of D if γ − λT and ‖w* − μ₀‖² stayed fixed; it always moves
        # uphill (the sign of D), so it is the fallback whenever the other steps point the wrong way
        num = 2 * D + st.lam_sq
        step = math.log(num / st.lam_sq) if num > 0 and st.lam_sq > 0 else math.copysign(3.0, D)
        pos = [r for r, t in terms if t.slope > 0]  # evidence increasing there: the maximum lies above
        neg = [r for r, t in terms if t.slope < 0]
        bracketed = bool(pos and neg and max(pos) < min(neg))
        if len(terms) >= 2:
            root = model_step(terms[-2], terms[-1], max_step)
            if root is not None and math.isfinite(root):
                step = root - rho
            else:  # a secant on D, expanded while D shrinks slowly
                (r0, t0), (r1, t1) = terms[-2], terms[-1]
                d0, d1 = t0.slope, t1.slope
                sec = r1 - d1 * (r1 - r0) / (d1 - d0) if d1 != d0 else math.nan
                if math.isfinite(sec) and (sec - rho) * D > 0:
                    step = sec - rho
                if not bracketed and d0 * d1 > 0 and abs(d1) > 0.25 * abs(d0):
                    step = math.copysign(max(abs(step), 2 * abs(prev_step)), D)
        new = rho + step
        if bracketed:
            a, b = max(pos), min(neg)
            if b - a < rtol:
                ml.converged = True
                break
            if not (a < new < b):
                new = 0.5 * (a + b)
        new = min(max(new, rho - max_step, lo_b), rho + max_step, hi_b)
        if abs(new - rho) < rtol:  # settled, or pushed against a bound (λ → 0 or ∞)
            ml.converged = True
            break
        prev_step, rho = new - rho, new
        info = backend.fit(math.exp(rho), tol, max_iter)
    return math.exp(rho), info, ml
