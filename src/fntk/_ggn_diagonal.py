r"""Exact diagonal and dense form of the GGN G = Σ_i J_iᵀ H_i J_i (part of :mod:`fntk.curvature`).

With the factorisation H_i = Q_i diag(λ_i) Q_iᵀ (Q_i (k, m)) from the likelihood,

    diag(G)_j = Σ_i Σ_c λ_ic (B_i)_cj²,   B_i = Q_iᵀ J_i  (m, p).

- Per layer, for an ``nn.Linear`` applied once per point to a (n, d_in) input a with output
  gradients g_ic = ∂(Q_i[:, c]ᵀ f_i)/∂(layer output) (d_out,), the rows of B_i for its weight are
  g_ic a_iᵀ, so diag_W = Σ_{i,c} λ_ic g_ic² (a_i²)ᵀ and diag_b = Σ_{i,c} λ_ic g_ic². Activations
  and output gradients come from one forward and one vmapped backward over c, with the private
  module's Linear layers tapped by temporary forward hooks (removed afterwards); B_i is never formed.
- Everything else (convolutions, norms, embeddings, shared or tied layers) uses per-example
  Jacobians of just those parameters (vmap over points of jacrev), in chunks of points.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from fntk.likelihoods import Likelihood
from fntk.linearize import Linearized


def _prepare(lin, x, likelihood, y, _f):
    if not isinstance(lin, Linearized):
        raise TypeError(f"lin must be a fntk.Linearized, got {type(lin).__name__}")
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"likelihood must be a fntk.likelihoods.Likelihood, got {type(likelihood).__name__}")
    if _f is None:
        x = lin.check_input(x)
        _f = likelihood.check_outputs(lin.forward(x), "model output")
        y = likelihood.check_target(y, _f)
    return x, y, _f


def _scale(reduction: str, n: int) -> float:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return 1.0 if reduction == "sum" else 1.0 / n


def _linear_layers(lin: Linearized, x: Tensor) -> dict[str, nn.Linear]:
    """Selected ``nn.Linear`` modules (name → module) whose diagonal is per-layer exact: each is
    called once per forward on a (batch, d_in) input and owns its (untied) parameters."""
    module = lin.module
    uses: dict[int, int] = {}
    for _, prm in module.named_parameters(remove_duplicate=False):
        uses[id(prm)] = uses.get(id(prm), 0) + 1
    sel = set(lin.names)
    cands = {}
    for name, mod in module.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        pnames = [
            f"{name}.{a}" if name else a
            for a, t in (("weight", mod.weight), ("bias", mod.bias))
            if t is not None
        ]
        owned = [uses[id(getattr(mod, pn.rsplit(".", 1)[-1]))] == 1 for pn in pnames]
        if all(owned) and any(pn in sel for pn in pnames):
            cands[name] = mod
    if not cands:
        return {}
    calls: dict[str, list[tuple[int, ...]]] = {name: [] for name in cands}

    def tap(name):
        def hook(_m, inp, _out):
            calls[name].append(tuple(inp[0].shape))

        return hook

    probe = x[: min(2, x.shape[0])]
    handles = [mod.register_forward_hook(tap(name)) for name, mod in cands.items()]
    try:
        with torch.no_grad():
            lin.function(probe)(lin._theta)
    finally:
        for h in handles:
            h.remove()
    m = probe.shape[0]
    return {name: cands[name] for name, c in calls.items() if len(c) == 1 and len(c[0]) == 2 and c[0][0] == m}


def _param_names(name: str, mod: nn.Linear, sel: set[str]) -> tuple[str | None, str | None]:
    w = f"{name}.weight" if name else "weight"
    b = (f"{name}.bias" if name else "bias") if mod.bias is not None else None
    return (w if w in sel else None), (b if b in sel else None)


def _linear_diag_chunk(lin: Linearized, xs: Tensor, layers: dict[str, nn.Linear], Q: Tensor, lam: Tensor):
    """Per-layer diagonal contributions of one chunk of points: {param name: tensor of its shape}."""
    state: dict = {}

    def tap(name):
        def hook(_m, inp, out):
            if "deltas" not in state:
                return None
            state["acts"][name] = inp[0]
            return out + state["deltas"][name]

        return hook

    m = xs.shape[0]
    zeros = {
        name: torch.zeros(m, mod.out_features, dtype=lin.dtype, device=lin.device)
        for name, mod in layers.items()
    }
    f = lin.function(xs)

    def run(deltas):
        state["deltas"], state["acts"] = deltas, {}
        out = f(lin._theta)
        return out, dict(state["acts"])

    handles = [mod.register_forward_hook(tap(name)) for name, mod in layers.items()]
    try:
        _, pull, acts = vjp(run, zeros, has_aux=True)
    finally:
        for h in handles:
            h.remove()
        state.clear()
    grads = vmap(lambda q: pull(q)[0], in_dims=2)(Q)  # name → (m_cols, m, d_out)
    sel, res = set(lin.names), {}
    for name, mod in layers.items():
        g2 = grads[name] ** 2 * lam.T[:, :, None]  # (c, m, d_out), weighted by λ
        wname, bname = _param_names(name, mod, sel)
        if wname is not None:
            res[wname] = torch.einsum("cmo,mi->oi", g2, acts[name].detach() ** 2)
        if bname is not None:
            res[bname] = g2.sum((0, 1))
        del g2
    return res


def _jac_subset(lin: Linearized, names: list[str]):
    """x (m, ...) ↦ per-example Jacobians of the named parameters only: (m, k, p_sub)."""
    module, fixed, theta = lin._module, lin._fixed, lin._theta
    rest = {n: t for n, t in theta.items() if n not in names}

    def f1(th, xi):
        return functional_call(module, {**fixed, **rest, **th}, (xi[None],)).reshape(-1)

    jac = vmap(jacrev(f1), in_dims=(None, 0))
    sub = {n: theta[n] for n in names}

    def run(xs: Tensor) -> Tensor:
        J = jac(sub, xs)
        return torch.cat([J[n].reshape(*J[n].shape[:2], -1) for n in names], dim=-1)

    return run


def ggn_diagonal(
    lin: Linearized,
    x: Tensor,
    likelihood: Likelihood,
    y: Tensor | None = None,
    reduction: str = "sum",
    structured: bool = True,
    _f: Tensor | None = None,
) -> Tensor:
    r"""Exact diag(G) (p,), G = s Σ_i J_iᵀ H_i J_i, without forming G.

    ``structured=False`` forces per-example Jacobians for every parameter (slower; for checks).
    """
    x, y, f = _prepare(lin, x, likelihood, y, _f)
    Q, lam = likelihood._factors(f, y)  # (n, k, m), (n, m)
    n, k = f.shape
    layers = _linear_layers(lin, x) if structured else {}
    sel = set(lin.names)
    fast = {pn for name, mod in layers.items() for pn in _param_names(name, mod, sel) if pn is not None}
    slow = [nm for nm in lin.names if nm not in fast]
    parts = {nm: torch.zeros_like(lin._theta[nm]) for nm in lin.names}
    if layers:
        width = sum(mod.in_features + 2 * mod.out_features for mod in layers.values())
        size = lin._rows_per_chunk(Q.shape[2], extra_per_row=Q.shape[2] * width)
        for s in lin._chunks(n, size):
            for nm, d in _linear_diag_chunk(lin, x[s], layers, Q[s], lam[s]).items():
                parts[nm] += d
    if slow:
        p_sub = sum(lin._theta[nm].numel() for nm in slow)
        jac = _jac_subset(lin, slow)
        size = lin._rows_per_chunk(k, extra_per_row=3 * (k + Q.shape[2]) * p_sub)
        acc = torch.zeros(p_sub, dtype=lin.dtype, device=lin.device)
        for s in lin._chunks(n, size):
            B = torch.einsum("mkp,mkc->mcp", jac(x[s]), Q[s])
            acc += torch.einsum("mc,mcp->p", lam[s], B**2)
        for nm, d in zip(slow, torch.split(acc, [lin._theta[nm].numel() for nm in slow])):
            parts[nm] = d.reshape(lin._theta[nm].shape)
    return _scale(reduction, n) * lin.flatten(parts)


def ggn_dense(
    lin: Linearized,
    x: Tensor,
    likelihood: Likelihood,
    y: Tensor | None = None,
    reduction: str = "sum",
    _f: Tensor | None = None,
) -> Tensor:
    r"""Dense G = s Σ_i B_iᵀ diag(λ_i) B_i (p, p), B_i = Q_iᵀ J_i, from chunks of per-example Jacobians."""
    x, y, f = _prepare(lin, x, likelihood, y, _f)
    Q, lam = likelihood._factors(f, y)
    n, k = f.shape
    p = lin.num_params
    G = torch.zeros(p, p, dtype=lin.dtype, device=lin.device)
    size = lin._rows_per_chunk(k, extra_per_row=3 * (k + Q.shape[2]) * p)
    for s in lin._chunks(n, size):
        B = torch.einsum("mkp,mkc->mcp", lin.jacobian_mat(x[s]), Q[s]).reshape(-1, p)
        G += B.T @ (B * lam[s].reshape(-1, 1))
    return _scale(reduction, n) * G
