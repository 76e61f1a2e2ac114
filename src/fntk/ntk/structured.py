r"""STRUCTURED: the exact NTK from per-layer activations and output-gradients, never forming J.

For a layer whose weight W (d_out × d_in) is shared over S positions of a point (sequence items,
convolution output pixels), y_s = W a_s + b, the gradient of output c of point i is
∂f_c(x_i)/∂W = Σ_s G_ics a_isᵀ with G_ics = ∂f_c(x_i)/∂y_is, so the layer's NTK term is

    K_W[i,c,j,d] = Σ_{s,t} (a_is·a_jt) (G_ics·G_jdt),    (S = 1:  (A Aᵀ) ⊙ (G Gᵀ))

and the bias adds Σ_{s,t} G_ics·G_jdt (an extra constant 1 in every a). Per layer we either use
this factored ("kron") form, costing S²(d_in + k'² d_out) per pair of points, or form the
per-example gradient Σ_s G_ics a_isᵀ explicitly ("explicit", d_in·d_out per point and output)
and contract — whichever the cost model says is cheaper. Covered: ``nn.Linear`` (any extra
leading axes: S = their product), ``nn.Conv1d``/``nn.Conv2d`` (a over unfold patches, any
stride/padding/dilation/padding mode; groups > 1 explicit), ``nn.Embedding`` (a one-hot: a·a' =
[token = token']; padding_idx rows get no gradient), and the affine parameters of BatchNorm (eval,
running statistics), LayerNorm and GroupNorm (explicit: ∂f/∂γ = Σ G ⊙ x̂, ∂f/∂β = Σ G).

Activations a and gradients G come from one forward pass of the private eval-mode copy
``lin.module`` (temporary forward hooks, removed in ``finally``) and one backward pass batched
(vmapped) over the k' one-hot output cotangents (:mod:`fntk.linearize.taps`). Parameters of other
module types, parameters shared by several modules or of a module called more than once (tying),
and modules whose inputs are not point-major, fall back to exact per-example Jacobian contraction
for just those parameters; their Jacobian rows join the explicit features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fntk.linearize import Linearized
from fntk.linearize.taps import Analysis, Layer, analyze, features
from fntk.ntk.blocks import ACT_FACTOR, Blocks, Outputs, chunks, gram, pairs, plan_blocks, run_blocks
from fntk.ntk.contraction import jacobian_bytes
from fntk.ntk.costs import ELEM

__all__ = ["analyze", "choose_modes", "features", "plan", "structured_ntk"]



# ---------------------------------------------------------------------------------- cost model
def layer_cost(L: Layer, kk: int, mode: str, kron: bool) -> tuple[float, float, float]:
    """(per-pair flop-equivalents, per-point flop-equivalents, per-point kept numbers)."""
    S, di, do = L.S, L.d_in + (1 if L.bias else 0), L.d_out
    kpair = kk * kk if mode == "full" else kk
    if kron:
        aa = S * S * (ELEM if L.kind == "embedding" else 2 * di)
        pair = aa + 2 * S * S * kpair * do + ELEM * S * S * (1 + (3 if S > 1 else 2) * kpair)
        return pair, ELEM * (S * di + kk * S * do), S * (1 if L.kind == "embedding" else di) + kk * S * do
    q = L.q()
    form = 2 * kk * S * q if L.kind != "embedding" else ELEM * kk * (q + S * do)
    return 2 * kpair * q, form, kk * q


def choose_modes(an: Analysis, n1: int, n2: int, sym: bool, spec: Outputs, limit: float) -> list[str]:
    """Per layer "kron" or "explicit", whichever the cost model finds cheaper for this call."""
    npairs = n1 * (n1 + 1) / 2 if sym else n1 * n2
    points = n1 if sym else n1 + n2
    modes = []
    for L in an.layers:
        ok = L.can_kron() and 3 * L.S**2 * (1 + spec.kk**2) * 8 <= limit
        pk, fk, _ = layer_cost(L, spec.kk, spec.mode, True) if ok else (math.inf, 0, 0)
        pe, fe, _ = layer_cost(L, spec.kk, spec.mode, False)
        modes.append("kron" if npairs * pk + points * fk <= npairs * pe + points * fe else "explicit")
    return modes


@dataclass
class StructuredPlan:
    modes: list[str]
    blocks: Blocks
    limit: float  # bytes for one S > 1 factored block
    gemm: float  # flop-equivalents of Grams and feature forming
    ad: float  # flops of forward/backward passes


def plan(
    lin: Linearized, an: Analysis, n1: int, n2: int, sym: bool, spec: Outputs, budget: int,
    force: str | None = None,
) -> StructuredPlan:
    """Per-layer forms, block sizes under ``budget`` bytes (the output included) and cost estimate.

    Kept per point: k'·q numbers per explicit layer, S·d_in + k'·S·d_out per factored layer, k'·p
    per fallback parameter; transient per point: the forward/backward activations (about
    ACT_FACTOR·act·(1 + k')); per pair of points: the Gram blocks (k'² or k' numbers per layer).
    ``force``: "kron" (every layer that can) or "explicit" instead of the cost model's choice.
    Raises NTKMemoryError when not even one point per block fits.
    """
    item = torch.finfo(lin.dtype).bits // 8
    kk, act = spec.kk, lin.activation_numel
    avail = budget - spec.nbytes(n1, n2, lin.dtype)
    limit = max(avail / 4, 0)
    if force is None:
        modes = choose_modes(an, n1, n2, sym, spec, limit)
    else:
        modes = ["kron" if force == "kron" and L.can_kron() else "explicit" for L in an.layers]
    has_big = any(m == "kron" and L.S > 1 for L, m in zip(an.layers, modes))
    kpair = kk * kk if spec.mode == "full" else kk
    kept = kk * an.p_fallback * item
    pair_b = 2 * kpair * item
    gemm_pair, gemm_point = 2.0 * kpair * an.p_fallback, 2.0 * ELEM * kk * an.p_fallback
    for L, m in zip(an.layers, modes):
        pc, fc, nk = layer_cost(L, kk, spec.mode, m == "kron")
        kept += nk * item
        gemm_pair, gemm_point = gemm_pair + pc, gemm_point + fc
        if m == "kron" and L.S == 1:
            pair_b += (1 + kpair) * item
    _, fb_work = jacobian_bytes(lin, kk, an.p_fallback)
    work = ACT_FACTOR * act * (1 + kk) * item + 2 * kept + (fb_work if an.fallback else 0)
    rest = avail - (limit if has_big else 0)
    blocks = plan_blocks(n1, n2, sym, kept, work, pair_b, rest, "structured NTK", kk)
    npairs = pairs(n1, n2, sym, blocks.b1)
    passes = (n1 if sym else n1 + n2) + (0 if blocks.cache2 else n2 * (math.ceil(n1 / blocks.b1) - 1))
    ad = passes * 2 * an.flops * ((1 + kk if an.layers else 0) + (2 * kk + 1 if an.fallback else 0))
    return StructuredPlan(modes, blocks, limit, npairs * gemm_pair + passes * gemm_point, ad)


# ---------------------------------------------------------------------------------- the kernel
def structured_ntk(
    lin: Linearized, x1: Tensor, x2: Tensor, sym: bool, spec: Outputs, budget: int,
    force: str | None = None,
) -> Tensor:
    """The canonical kernel (see :mod:`fntk.ntk.blocks`) from per-layer factors; ``force`` as in
    :func:`plan` (both per-layer forms are exact)."""
    an = analyze(lin, x1)
    n1, n2 = x1.shape[0], x2.shape[0]
    pl = plan(lin, an, n1, n2, sym, spec, budget, force)
    kron = [L for L, m in zip(an.layers, pl.modes) if m == "kron"]
    fb = lin.per_example_jacobian(an.fallback, spec.index) if an.fallback else None
    dd = (lin.dtype, lin.device)

    def gram_fn(F1: list[Tensor], F2: list[Tensor]) -> Tensor:
        blk = gram(F1[0], F2[0], spec.mode)
        for t, L in enumerate(kron):
            a1, g1, a2, g2 = F1[1 + 2 * t], F1[2 + 2 * t], F2[1 + 2 * t], F2[2 + 2 * t]
            blk += _kron_gram(L.kind == "embedding", a1, g1, a2, g2, spec.mode, pl.limit)
        return blk

    return run_blocks(
        spec.shape(n1, n2), spec.mode, n1, n2, sym, pl.blocks,
        lambda s: features(lin, an, pl.modes, spec.cotangents(s.stop - s.start, *dd), x1[s], fb),
        lambda s: features(lin, an, pl.modes, spec.cotangents(s.stop - s.start, *dd), x2[s], fb),
        gram_fn, lin.dtype, lin.device,
    )


def _aa(emb: bool, A1: Tensor, A2: Tensor, dtype: torch.dtype) -> Tensor:
    """Σ_features a_is a_jt → (b1, S, b2, S); for Embedding [token_is = token_jt]."""
    b1, S = A1.shape[:2]
    b2 = A2.shape[0]
    if emb:
        return (A1.reshape(-1, 1) == A2.reshape(1, -1)).to(dtype).view(b1, S, b2, S)
    return (A1.reshape(b1 * S, -1) @ A2.reshape(b2 * S, -1).T).view(b1, S, b2, S)


def _kron_gram(emb: bool, A1: Tensor, G1: Tensor, A2: Tensor, G2: Tensor, mode: str, limit: float):
    """Σ_{s,t} (a_is·a_jt)(G_ics·G_jdt) in canonical layout; S > 1 in row chunks under ``limit``."""
    b1, kk, S, do = G1.shape
    b2 = G2.shape[0]
    if S == 1:
        AA = _aa(emb, A1, A2, G1.dtype)[:, 0, :, 0]
        if mode == "full":
            GG = (G1.reshape(b1 * kk, do) @ G2.reshape(b2 * kk, do).T).view(b1, kk, b2, kk)
            return GG.mul_(AA[:, None, :, None])
        return torch.bmm(G1[:, :, 0].transpose(0, 1), G2[:, :, 0].permute(1, 2, 0)).mul_(AA)
    kp = kk * kk if mode == "full" else kk
    rows = max(1, int(limit // (3 * b2 * S * S * (1 + kp) * G1.element_size())))
    out = []
    for s in chunks(b1, rows):
        m = s.stop - s.start
        AA = _aa(emb, A1[s], A2, G1.dtype)
        if mode == "full":
            GG = (G1[s].reshape(m * kk * S, do) @ G2.reshape(b2 * kk * S, do).T).view(m, kk, S, b2, kk, S)
            out.append(torch.einsum("icsjdt,isjt->icjd", GG, AA))
        else:
            GG = torch.einsum("icsd,jctd->cisjt", G1[s], G2)
            out.append(torch.einsum("cisjt,isjt->cij", GG, AA))
        del GG, AA
    return torch.cat(out, 0 if mode == "full" else 1)
