r"""Multi-column Jacobian products from layer taps, for networks of ``nn.Linear`` layers (and norm
affines): J V, Jᵀ U and Jᵀ H J V with r columns at GEMM speed.

For a Linear layer y = W a + b on point-major inputs (one position per point), the Jacobian row of
output c of point i is ∂f_c(x_i)/∂W = g_ic a_iᵀ with g_ic = ∂f_c(x_i)/∂y_i (the tap of
:func:`fntk.linearize.taps.features`: one forward recording a, one backward batched over the k'
outputs giving g). So, with the weights and bias of the layer as one (d_out × d̃) block per
column (ã = [a, 1]),

    (J V)_icr = Σ_layers g_icᵀ (V_r ã_i),     (Jᵀ U)_r = Σ_i (Σ_c U_icr g_ic) ã_iᵀ:

two GEMMs per layer for all r columns ((n × d̃)(d̃ × r·d_out) and its transpose), against the
four passes per column (a forward-mode tangent through every layer, inputs and weights, then a
backward pass) of vmapped autodiff. Norm affines and bias-only layers enter through their explicit
per-example gradients (k'·q numbers per point). The taps are computed once per chunk of points
and kept when they fit half the memory budget, so that repeated products (CG, Lanczos) cost
only the GEMMs.

Applies (:func:`tapped_layers`) when every selected parameter has a layer rule (no fallback) of
kind "linear" with one position per point, or "norm"; and only after the products agreed with the
probed autodiff path (``lin.vjp_block``/``lin.jvp_block``) on the probe batch for random V (the
probes' tolerance), checked once per ``Linearized``. Otherwise callers keep the autodiff path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from fntk.linearize.linearized import Linearized
from fntk.linearize.probes import close, tolerance
from fntk.linearize.taps import Analysis, analyze, features

_verdict: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tapped_layers(lin: Linearized, x: Tensor) -> Analysis | None:
    """The layer analysis when tapped products apply to ``lin`` and were validated (see the module
    docstring), else None. x: checked inputs (its first point is used by :func:`analyze`)."""
    if lin in _verdict:
        return _verdict[lin]
    an = analyze(lin, x)
    ok = bool(an.layers) and not an.fallback and all(
        L.kind == "norm" or (L.kind == "linear" and L.S == 1) for L in an.layers
    )
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


class TappedJacobian:
    """J(x) products from the taps of x (n points), chunked over points to the memory budget; the
    taps are kept between products when ``keep`` and they fit half the budget."""

    def __init__(self, lin: Linearized, x: Tensor, an: Analysis, keep: bool = True):
        self.lin, self.x, self.an = lin, x, an
        self.k = lin.num_outputs
        self.modes = ["kron" if L.kind == "linear" and L.weight else "explicit" for L in an.layers]
        offsets, o = {}, 0
        for name, size in zip(lin.names, lin.numels):
            offsets[name] = (o, o + size)
            o += size
        self._slices = offsets
        kept, flops = 0, 0.0  # numbers kept per point; flops of one J V (or Jᵀ U) column per point
        self._explicit: list[str] = []  # parameter names of X's columns, in order
        for L, m in zip(an.layers, self.modes):
            if m == "kron":
                d = L.d_in + (1 if L.bias else 0)
                kept += d + self.k * L.d_out
                flops += 2.0 * L.d_out * (d + self.k)
            else:
                names = [n for n in (L.weight, L.bias) if n]
                self._explicit += names
                q = sum(offsets[n][1] - offsets[n][0] for n in names)
                kept += self.k * q
                flops += 2.0 * self.k * q
        #: flops of one J V or Jᵀ U column over all points (fntk.ntk.costs.tapped_product_seconds)
        self.column_flops = flops * x.shape[0]
        item = torch.finfo(lin.dtype).bits // 8
        size = lin.rows_per_chunk(self.k, extra_per_row=2 * kept)
        self._chunks = lin.chunks(x.shape[0], size)
        self._keep = keep and x.shape[0] * kept * item <= lin.memory_budget // 2
        self._taps: dict[int, list[Tensor]] = {}

    def cached(self) -> bool:
        """Whether every chunk's taps are kept from an earlier product."""
        return self._keep and len(self._taps) == len(self._chunks)

    def taps(self, s: slice) -> list[Tensor]:
        """[X (b, k, Q), then (A (b, 1, d̃), G (b, k, 1, d_out)) per Linear layer] for x[s]."""
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
        for L, m in zip(self.an.layers, self.modes):
            if m != "kron":
                continue
            w0, w1 = self._slices[L.weight]
            W = V[w0:w1].T.reshape(r, L.d_out, L.d_in)
            if L.bias:
                b0, b1 = self._slices[L.bias]
                W = torch.cat([W, V[b0:b1].T[:, :, None]], 2)
            blocks.append(W)
        Vx = torch.cat([V[slice(*self._slices[n])] for n in self._explicit]) if self._explicit else None
        return blocks, Vx

    def _jv(self, F: list[Tensor], blocks: list[Tensor], Vx: Tensor | None, r: int) -> Tensor:
        b = F[0].shape[0]
        out = F[0] @ Vx if Vx is not None else F[0].new_zeros(b, self.k, r)
        for t, W in enumerate(blocks):
            A, G = F[1 + 2 * t][:, 0], F[2 + 2 * t][:, :, 0]  # (b, d̃), (b, k, d_out)
            T = (A @ W.reshape(-1, W.shape[2]).T).view(b, r, W.shape[1])  # V_r ã_i
            out = out + torch.bmm(G, T.transpose(1, 2))
        return out

    def _jtu(self, F: list[Tensor], U: Tensor, out: Tensor) -> None:
        """out += Jᵀ U for the chunk's taps F and U (b, k, r)."""
        b, r = U.shape[0], U.shape[2]
        t = 0
        if self._explicit:
            g = torch.einsum("bkq,bkr->qr", F[0], U)
            o = 0
            for name in self._explicit:
                a, z = self._slices[name]
                out[a:z] += g[o : o + z - a]
                o += z - a
        for L, m in zip(self.an.layers, self.modes):
            if m != "kron":
                continue
            A, G = F[1 + 2 * t][:, 0], F[2 + 2 * t][:, :, 0]
            t += 1
            B = torch.bmm(U.transpose(1, 2), G)  # (b, r, d_out): Σ_c U_icr g_ic
            g = (B.reshape(b, -1).T @ A).view(r, L.d_out, -1)
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
