r"""Exact diagonal and dense form of the GGN G = Σ_i J_iᵀ H_i J_i (used by :class:`GGNOperator`).

With the factorisation H_i = Q_i diag(λ_i) Q_iᵀ (Q_i (k, m)) from the likelihood,

    diag(G)_j = Σ_i Σ_c λ_ic (B_i)_cj²,   B_i = Q_iᵀ J_i  (m, p).

The rows of B_i are the per-example gradients of the output combinations Q_i[:, c]ᵀ f_i, taken
from the layer taps (:mod:`fntk.linearize.taps`: one forward and one backward batched over the m
combinations, the cotangents being the columns of Q_i):

- a layer the taps cover with one position per point (``nn.Linear`` on (n, d_in) inputs): with
  input a_i and output gradients g_ic, (B_i)_c = g_ic a_iᵀ, so diag_W = Σ_{i,c} λ_ic g_ic² (a_i²)ᵀ
  (and diag_b = Σ λ_ic g_ic²) without forming B_i;
- other covered layers (convolutions, sequence Linear, embeddings, norm affines): the explicit
  per-example gradients, squared and weighted;
- everything else (other module types, tied or shared parameters, exotic subclasses): per-example
  Jacobian rows of just those parameters from the engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fntk import inputs
from fntk.likelihoods import Likelihood, resolve
from fntk.linearize import Linearized
from fntk.linearize.taps import analyze, features


def prepare(lin, x, likelihood, y, f):
    """Checked (x, y, f) for a GGN of ``likelihood`` at ``lin``'s outputs (f given: x, y are checked).
    A loader x becomes a validated :class:`fntk.inputs.Stream` (f from one streamed forward)."""
    if not isinstance(lin, Linearized):
        raise TypeError(f"lin must be a fntk.Linearized, got {type(lin).__name__}")
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"likelihood must be a fntk.likelihoods.Likelihood, got {type(likelihood).__name__}")
    if f is None:
        x = inputs.Stream.of(x, "x") if inputs.is_loader(x) else lin.check_input(x)
        f = likelihood.check_outputs(lin.forward(x), "model output")
        y = likelihood.check_target(y, f)
    return x, y, f


def _scale(reduction: str, n: int) -> float:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return 1.0 if reduction == "sum" else 1.0 / n


def _over_batches(lin, x, y, f, part) -> Tensor:
    """Σ_b part(x_b, y_b, f_b) over the batches of a loader x, y and f (n, ...) split by the batches' rows."""
    total = None
    for xb, s in lin.row_chunks(x, None):
        term = part(xb, None if y is None else y[s], f[s])
        total = term if total is None else total + term
    return total


def _layer_params(L) -> list[str]:
    return [n for n in (L.weight, L.bias) if n]


def ggn_diagonal(
    lin: Linearized,
    x: Tensor,
    likelihood: Likelihood | str,
    y: Tensor | None = None,
    reduction: str = "sum",
    structured: bool = True,
    f: Tensor | None = None,
) -> Tensor:
    r"""Exact diag(G) (p,), G = s Σ_i J_iᵀ H_i J_i, without forming G.

    ``likelihood``: a :class:`~fntk.likelihoods.Likelihood` or its name (:func:`fntk.likelihoods.resolve`).
    ``f``: the outputs (n, k) at which H is taken (then x and y must be checked already);
    ``structured=False`` uses per-example Jacobians for every parameter (slower; for checks).
    x may be a loader (re-iterable of batches): the diagonal is summed batch by batch.
    """
    likelihood = resolve(likelihood)
    x, y, f = prepare(lin, x, likelihood, y, f)
    if inputs.is_loader(x):
        return _scale(reduction, f.shape[0]) * _over_batches(
            lin, x, y, f, lambda xb, yb, fb: ggn_diagonal(lin, xb, likelihood, yb, "sum", structured, fb))
    Q, lam = likelihood.pure_factors(f, y)  # (n, k, m), (n, m)
    n, m = f.shape[0], Q.shape[2]
    if structured:
        an = analyze(lin, x)
        layers, slow = an.layers, list(an.fallback)
    else:
        an, layers, slow = None, [], list(lin.names)
    theta = lin.theta_dict()
    parts = {nm: torch.zeros_like(theta[nm]) for nm in lin.names}
    if layers:
        # kron (factored) only for one position per point: then the diagonal separates into a² ⊗ g²
        modes = ["kron" if L.S == 1 and L.can_kron() and L.kind != "embedding" else "explicit"
                 for L in layers]
        q_explicit = sum(L.q() for L, md in zip(layers, modes) if md == "explicit")
        width = sum(L.d_in + 2 * L.d_out + 1 for L, md in zip(layers, modes) if md == "kron")
        size = lin.rows_per_chunk(m, extra_per_row=3 * m * (q_explicit + width))
        for s in lin.chunks(n, size):
            E = Q[s].permute(2, 0, 1).to(lin.dtype)  # (m, b, k): cotangents Q_i[:, c]
            lam_s = lam[s].to(lin.dtype)
            feats = features(lin, an, modes, E, x[s])
            X, off, t = feats[0], 0, 1
            for L, md in zip(layers, modes):
                if md == "explicit":
                    for nm in _layer_params(L):
                        q = theta[nm].numel()
                        d = torch.einsum("bc,bcq->q", lam_s, X[:, :, off : off + q].square())
                        parts[nm] += d.reshape(theta[nm].shape)
                        off += q
                    continue
                A, G = feats[t], feats[t + 1]  # (b, 1, d_in [+1]), (b, m, 1, d_out)
                t += 2
                g2 = torch.einsum("bc,bco->bo", lam_s, G[:, :, 0].square())  # two operands at a time
                D = torch.einsum("bo,bi->oi", g2, A[:, 0].square())
                if L.weight:
                    parts[L.weight] += D[:, : L.d_in].reshape(theta[L.weight].shape)
                if L.bias:
                    parts[L.bias] += D[:, -1]
    if slow:
        numels = [theta[nm].numel() for nm in slow]
        jac = lin.per_example_jacobian(slow)
        k = f.shape[1]
        size = lin.rows_per_chunk(k, extra_per_row=3 * (k + m) * sum(numels))
        acc = torch.zeros(sum(numels), dtype=lin.dtype, device=lin.device)
        for s in lin.chunks(n, size):
            B = torch.einsum("mkp,mkc->mcp", jac(x[s]), Q[s].to(lin.dtype))
            acc += torch.einsum("mc,mcp->p", lam[s].to(lin.dtype), B**2)
        for nm, d in zip(slow, torch.split(acc, numels)):
            parts[nm] = d.reshape(theta[nm].shape)
    return _scale(reduction, n) * lin.flatten(parts)


def ggn_dense(
    lin: Linearized,
    x: Tensor,
    likelihood: Likelihood | str,
    y: Tensor | None = None,
    reduction: str = "sum",
    f: Tensor | None = None,
) -> Tensor:
    r"""Dense G = s Σ_i B_iᵀ diag(λ_i) B_i (p, p), B_i = Q_iᵀ J_i, from chunks of per-example Jacobians
    (a loader x: summed batch by batch)."""
    likelihood = resolve(likelihood)
    x, y, f = prepare(lin, x, likelihood, y, f)
    if inputs.is_loader(x):
        return _scale(reduction, f.shape[0]) * _over_batches(
            lin, x, y, f, lambda xb, yb, fb: ggn_dense(lin, xb, likelihood, yb, "sum", fb))
    Q, lam = likelihood.pure_factors(f, y)
    n, k = f.shape
    p = lin.num_params
    G = torch.zeros(p, p, dtype=lin.dtype, device=lin.device)
    size = lin.rows_per_chunk(k, extra_per_row=3 * (k + Q.shape[2]) * p)
    for s in lin.chunks(n, size):
        B = torch.einsum("mkp,mkc->mcp", lin.jacobian_mat(x[s]), Q[s]).reshape(-1, p)
        G += B.T @ (B * lam[s].reshape(-1, 1))
    return _scale(reduction, n) * G


__all__ = ["ggn_diagonal", "ggn_dense", "prepare"]
