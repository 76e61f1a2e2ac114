r"""Classification with a linearized network: :class:`LinearizedClassifier` and its backends.

MAP and Laplace inference run in function space or in weight space (VI: :mod:`.vi`,
:mod:`.meanfield`; the GLM predictive: :mod:`.predictive`).

The model (n points, k outputs, p selected parameters):

    logits  f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂),      prior  w ~ N(μ₀, λ⁻¹ I_p),

μ₀ = θ̂ ("theta") or 0 ("zero"), and a likelihood with per-point NLL ℓ_i(f_i) whose output Hessian
is H_i = L_i L_iᵀ (k × m factors from :meth:`fntk.likelihoods.Likelihood.hessian_factors`). The
negative log posterior

    Ψ(w) = Σ_i ℓ_i(f_lin(x_i; w)) + (λ/2) ‖w − μ₀‖²

is convex, and its Hessian Jᵀ H(f_lin(w)) J + λ I is *exact* (f_lin is linear in w). So damped
Newton (with an Armijo backtracking line search; undamped steps can diverge) converges
quadratically, and the Laplace approximation q(w) = N(w*, (JᵀH(f*)J + λI)⁻¹) is the posterior's
curvature at the MAP, with H evaluated at the *linearized* logits f* = f_lin(x; w*).

Three backends (all internal algebra in float64):

- :class:`FunctionSpace` (n·k small, p large). By the representer theorem w* − μ₀ = Jᵀ a / λ, so
  with m₀(x) = f(x; θ̂) + J(x)(μ₀ − θ̂) and K̃ = J Jᵀ / λ (n·k × n·k, the empirical NTK) the logits
  are f = m₀ + K̃ a. Newton in f is Rasmussen & Williams' Algorithm 3.3 with the factors L:
  B = I + Lᵀ K̃ L, a_new = b − L B⁻¹ Lᵀ K̃ b, b = H h − ∇ℓ, h = f − m₀. The predictive at x*:
  mean m₀* + K̃*ₓ a, covariance K̃** − K̃*ₓ L B⁻¹ Lᵀ K̃ₓ* (Woodbury; exact).
- :class:`WeightSpace` with ``dense=True`` (n·k ≫ p, p up to a few thousand): the explicit J
  (n, k, p), Newton with a Cholesky of P = JᵀHJ + λI, covariance P⁻¹.
- :class:`WeightSpace` with ``dense=False`` (p and n·k both large): matrix-free Newton-CG
  (linear_operator's ``linear_cg`` on w ↦ Jᵀ H J w + λ w, products chunked over points by
  :class:`~fntk.Linearized`), and a Lanczos low-rank root of the GGN at f* for the covariance:
  Σ ≈ U diag(1/(s + λ)) Uᵀ + (I − U Uᵀ)/λ (the prior in the remaining directions).

Evidence (:meth:`log_evidence`): log Z(λ) ≈ −Ψ(w*) − ½ log det(I + G/λ), G = JᵀH(f*)J; λ is
chosen by maximising it (:func:`fntk.classify.evidence.optimize_prior_precision`: its exact slope
in log λ, secant steps started from MacKay's update λ ← γ / ‖w* − μ₀‖², γ = tr(G (G + λI)⁻¹)).
"""

from fntk.classify.classifier import INFERENCES, LinearizedClassifier
from fntk.errors import NotFittedError

__all__ = ["LinearizedClassifier", "INFERENCES", "NotFittedError"]
