r"""Multi-column Jacobian products from layer taps, for networks of ``nn.Linear`` and ``nn.Conv``
layers (and norm affines): J V, Jᵀ U and Jᵀ H J V with r columns at GEMM speed.

For a layer y_s = W a_s + b applied at S positions s of a point (S = 1 for a Linear on vectors;
tokens of a sequence; a convolution's output pixels with a_s its input patch), the Jacobian row of
output c of point i is ∂f_c(x_i)/∂W = Σ_s g_ics a_isᵀ with g_ics = ∂f_c(x_i)/∂y_is (the tap of
:func:`fntk.linearize.taps.features`: one forward recording a, one backward batched over the k'
outputs giving g). With the weights and bias of the layer as one (d_out × d̃) block per column
(ã = [a, 1]), a layer is used in one of two forms:

- "kron" (keeps ã and g: S·d̃ + k·S·d_out numbers per point):
  (J V)_icr = Σ_s g_icsᵀ (V_r ã_is),   (Jᵀ U)_r = Σ_i Σ_s (Σ_c U_icr g_ics) ã_isᵀ,
  two GEMMs per layer for all r columns (≈ 2 S d_out (d̃ + k) flops per point and column);
- "explicit" (keeps the per-example rows X_ic = Σ_s g_ics ã_isᵀ: k·q numbers per point): one
  (k × q)(q × r) product per point; taken for norm affines, bias-only and grouped layers, and for
  a weight shared over S > 1 positions when its rows are at most twice the kron taps and cheaper
  per column (e.g. the convolutions of a small CNN: q = 18,496 against 2 S d_out (d̃ + k) = 7.5 M
  flops per column for LeNet's second convolution).

Against the four passes per column of vmapped autodiff (a forward-mode tangent through every
layer, inputs and weights, then a backward pass). The taps are computed once per chunk of points
and kept when they fit half the memory budget, so that repeated products (CG, Lanczos) cost only
the GEMMs.

Applies (:func:`tapped_layers`) when every selected parameter has a layer rule (no fallback) of
kind "linear", "conv" or "norm"; and only after the products agreed with the probed autodiff path
(``lin.vjp_block``/``lin.jvp_block``) on the probe batch for random V (the probes' tolerance),
checked once per ``Linearized``. Otherwise callers keep the autodiff path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from fntk.linearize.linearized import Linearized
from fntk.linearize.probes import close, tolerance
from fntk.linearize.taps import Analysis, Layer, analyze, features

_verdict: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tapped_layers(lin: Linearized, x: Tensor) -> Analysis | None:
    """The layer analysis when tapped products apply to ``lin`` and were validated (see the module
    docstring), else None. x: checked inputs (its first point is used by :func:`analyze`)."""
    if lin in _verdict:
        return _verdict[lin]
    an = analyze(lin, x)
    ok = bool(an.layers) and not an.fallback and all(L.kind in ("norm", "linear", "conv") for L in an.layers)
    if ok:
        ok = _validate(lin, an)
    _verdict[lin] = an if ok else None
    return _verdict[lin]


def _validate(lin: Linearized, an: Analysis) -> bool:
    """Tapped J V and Jᵀ U against the probed autodiff products on the probe batch."""
    xb = lin._probe_x
    g = torch.Generator().manual_seed(4)
    V = torch.randn(lin.num_params, 2, generator=g, dtype=torch.float64).to(lin.dtype)
    U = torch.randn(xb.shape[0], lin.num_outputs, 2, generator=g, dtype=torch.float64).to(lin.dtype)
    tj = TappedJacobian(lin, xb, an, keep=False)
    tol = tolerance(lin.dtype)
    try:
        ok_j = close(tj.jvp(V), lin.jvp_block(xb, V), tol)[0]
        ok_t = close(tj.vjp(U), lin.vjp_block(xb, U), tol)[0]
    except (RuntimeError, ValueError):
        return False
    return ok_j and ok_t


def tap_cost(L: Layer, k: int, mode: str) -> tuple[int, float, float]:
    """Layer L with k outputs in ``mode``: (numbers kept per point, flops per point of one J V or
    Jᵀ U column, flops per point of forming its explicit rows Σ_s g_ics ã_isᵀ)."""
    if mode == "kron":
        d = L.d_in + (1 if L.bias else 0)
        return L.S * (d + k * L.d_out), 2.0 * L.S * L.d_out * (d + k), 0.0
    q = L.q()
    formed = 2.0 * k * L.S * q if L.weight and L.kind != "norm" and L.S > 1 else 0.0
    return k * q, 2.0 * k * q, formed


def layer_mode(L: Layer, k: int) -> str:
    """"kron" or "explicit" for layer L with k outputs (see the module docstring)."""
    if L.kind == "norm" or not L.can_kron():
        return "explicit"
    if L.S == 1:
        return "kron"
    kron_kept, kron_col, _ = tap_cost(L, k, "kron")
    rows, rows_col, _ = tap_cost(L, k, "explicit")
    return "explicit" if rows <= 2 * kron_kept and rows_col < kron_col else "kron"


class TappedJacobian:
    """J(x) products from the taps of x (n points), chunked over points to the memory budget; the
    taps are kept between products when ``keep`` and they fit half the budget."""

    def __init__(self, lin: Linearized, x: Tensor, an: Analysis, keep: bool = True):
        self.lin, self.x, self.an = lin, x, an
        self.k = lin.num_outputs
        self.modes = [layer_mode(L, self.k) for L in an.layers]
        offsets, o = {}, 0
        for name, size in zip(lin.names, lin.numels):
            offsets[name] = (o, o + size)
            o += size
        self._slices = offsets
        costs = [tap_cost(L, self.k, m) for L, m in zip(an.layers, self.modes)]
        kept = sum(c[0] for c in costs)  # numbers kept per point
        #: flops of one J V or Jᵀ U column, and of forming the explicit rows, over all points
        #: (fntk.ntk.costs.tapped_product_seconds)
        self.column_flops = sum(c[1] for c in costs) * x.shape[0]
        self.tap_flops = sum(c[2] for c in costs) * x.shape[0]
        #: parameter names of the explicit rows' columns, in order; the kron-form layers, in order
        layers = list(zip(an.layers, self.modes))
        self._explicit = [n for L, m in layers if m != "kron" for n in (L.weight, L.bias) if n]
        self._kron = [L for L, m in layers if m == "kron"]
        item = torch.finfo(lin.dtype).bits // 8
        size = lin.rows_per_chunk(self.k, extra_per_row=2 * kept)
        self._chunks = lin.chunks(x.shape[0], size)
        self._keep = keep and x.shape[0] * kept * item <= lin.memory_budget // 2
        self._work = max(1, lin.memory_budget // (4 * item))  # numbers of one S > 1 layer's temporaries
        self._taps: dict[int, list[Tensor]] = {}

    def keeps(self) -> bool:
        """Whether the taps are kept between products (they fit half the memory budget)."""
        return self._keep

    def cached(self) -> bool:
        """Whether every chunk's taps are kept from an earlier product."""
        return self._keep and len(self._taps) == len(self._chunks)

    def taps(self, s: slice) -> list[Tensor]:
        """[X (b, k, Q), then (A (b, S, d̃), G (b, k, S, d_out)) per kron-form layer] for x[s]."""
        if s.start in self._taps:
            return self._taps[s.start]
        b, lin = s.stop - s.start, self.lin
        E = torch.eye(self.k, dtype=lin.dtype, device=lin.device)[:, None, :].expand(self.k, b, self.k)
        with torch.no_grad():
            F = features(lin, self.an, self.modes, E, self.x[s])
        if self._keep:
            self._taps[s.start] = F
        return F

    def _blocks(self, V: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """V (p, r) → per Linear layer (r, d_out, d̃) blocks, and the explicit rows (Q, r)."""
        r, blocks = V.shape[1], []
        for L in self._kron:
            w0, w1 = self._slices[L.weight]
            W = V[w0:w1].T.reshape(r, L.d_out, L.d_in)
            if L.bias:
                b0, b1 = self._slices[L.bias]
                W = torch.cat([W, V[b0:b1].T[:, :, None]], 2)
            blocks.append(W)
        Vx = torch.cat([V[slice(*self._slices[n])] for n in self._explicit]) if self._explicit else None
        return blocks, Vx

    def _kron_layers(self, F: list[Tensor]):
        """(t, layer, A (b, S, d̃), G (b, k, S, d_out)) of the kron-form layers in the taps F."""
        return [(t, L, F[1 + 2 * t], F[2 + 2 * t]) for t, L in enumerate(self._kron)]

    def _sub(self, b: int, per_point: int) -> list[slice]:
        """Sub-batches of b points whose S > 1 temporaries (per_point numbers each) fit the budget."""
        return self.lin.chunks(b, self._work // max(per_point, 1))

    def _jv(self, F: list[Tensor], blocks: list[Tensor], Vx: Tensor | None, r: int) -> Tensor:
        b = F[0].shape[0]
        out = F[0] @ Vx if Vx is not None else F[0].new_zeros(b, self.k, r)
        for t, _, A, G in self._kron_layers(F):
            W = blocks[t]
            Wm = W.reshape(-1, W.shape[2])  # (r·d_out, d̃)
            S = A.shape[1]
            if S == 1:
                T = (A[:, 0] @ Wm.T).view(b, r, W.shape[1])  # V_r ã_i
                out = out + torch.bmm(G[:, :, 0], T.transpose(1, 2))
                continue
            for sb in self._sub(b, S * Wm.shape[0]):
                T = (A[sb] @ Wm.T).view(-1, S, r, W.shape[1])  # V_r ã_is
                out[sb] += torch.einsum("bkso,bsro->bkr", G[sb], T)
        return out

    def _jtu(self, F: list[Tensor], U: Tensor, out: Tensor) -> None:
        """out += Jᵀ U for the chunk's taps F and U (b, k, r)."""
        b, r = U.shape[0], U.shape[2]
        if self._explicit:
            g = torch.einsum("bkq,bkr->qr", F[0], U)
            o = 0
            for name in self._explicit:
                a, z = self._slices[name]
                out[a:z] += g[o : o + z - a]
                o += z - a
        Ut = U.transpose(1, 2)
        for _, L, A, G in self._kron_layers(F):
            S = A.shape[1]
            if S == 1:
                B = torch.bmm(Ut, G[:, :, 0])  # (b, r, d_out): Σ_c U_icr g_ic
                g = (B.reshape(b, -1).T @ A[:, 0]).view(r, L.d_out, -1)
            else:
                g = 0
                for sb in self._sub(b, S * r * L.d_out):
                    B = torch.bmm(Ut[sb], G[sb].reshape(-1, self.k, S * L.d_out))  # Σ_c U_icr g_ics
                    g = g + torch.einsum("brso,bsj->roj", B.view(-1, r, S, L.d_out), A[sb])
            w0, w1 = self._slices[L.weight]
            out[w0:w1] += g[:, :, : L.d_in].reshape(r, -1).T
            if L.bias:
                b0, b1 = self._slices[L.bias]
                out[b0:b1] += g[:, :, L.d_in].T

    def jvp(self, V: Tensor) -> Tensor:
        """J(x) V: V (p, r) → (n, k, r)."""
        blocks, Vx = self._blocks(V)
        return torch.cat([self._jv(self.taps(s), blocks, Vx, V.shape[1]) for s in self._chunks])

    def vjp(self, U: Tensor) -> Tensor:
        """J(x)ᵀ U: U (n, k, r) → (p, r)."""
        out = U.new_zeros(self.lin.num_params, U.shape[2])
        for s in self._chunks:
            self._jtu(self.taps(s), U[s], out)
        return out

    def ggn(self, V: Tensor, hop: Callable[[Tensor, slice], Tensor]) -> Tensor:
        """Σ_chunks Jᵀ hop(J V) (p, r), each chunk's taps used for both products; ``hop(u, s)`` maps
        (b, k, r) → (b, k, r) for the points s."""
        blocks, Vx = self._blocks(V)
        out = V.new_zeros(V.shape)
        for s in self._chunks:
            F = self.taps(s)
            self._jtu(F, hop(self._jv(F, blocks, Vx, V.shape[1]), s), out)
        return out


__all__ = ["tapped_layers", "TappedJacobian"]
