"""Layer taps: which parameters a known layer type covers, and per-point activations a and
output-gradients G of those layers (the structured NTK, :mod:`fntk.ntk.structured`, and the exact
GGN diagonal, :mod:`fntk.operators.ggn_diagonal`, are built from them), and the final-layer
tap of the last-layer backends (:func:`final_linear`, :func:`final_inputs`).

:func:`analyze` maps every selected parameter to a :class:`Layer` (``nn.Linear``, ``nn.Conv1d``,
``nn.Conv2d``, ``nn.Embedding``, BatchNorm/LayerNorm/GroupNorm affines) or to the fallback (other
module types, parameters shared by several modules or used by a module called more than once,
modules whose inputs are not point-major, and any parameter whose layer-rule gradient disagrees
with autograd on a probe point, e.g. a weight also used outside its module).

:func:`features` runs one forward pass of the private eval-mode copy ``lin.module`` with
temporary forward hooks (removed in ``finally``) recording each layer's input, and one backward
pass batched (vmapped) over the k' output cotangents giving G_ics = ∂f_c(x_i)/∂y_is at each
layer's output. Shapes: b points, k' outputs, S positions per point, d_in → d_out features.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fntk import inputs
from fntk.linearize import streaming
from fntk.linearize.linearized import Linearized
from fntk.linearize.probes import close, tolerance

_KINDS: dict[type, str] = {
    nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Embedding: "embedding",
    nn.BatchNorm1d: "norm", nn.BatchNorm2d: "norm", nn.BatchNorm3d: "norm",
    nn.LayerNorm: "norm", nn.GroupNorm: "norm",
}  # exact types: a subclass may override forward

@dataclass
class Layer:
    """A parameterised module handled structurally. S positions per point share the weight;
    d_in (per group; vocabulary for Embedding) → d_out features per position."""

    module: nn.Module
    kind: str
    weight: str | None = None
    bias: str | None = None
    S: int = 1
    d_in: int = 1
    d_out: int = 1
    groups: int = 1

    def q(self) -> int:
        """Parameters of the layer that are selected."""
        qw = self.d_in * self.d_out if self.kind in ("linear", "conv", "embedding") else self.d_out
        return (qw if self.weight else 0) + (self.d_out if self.bias else 0)

    def can_kron(self) -> bool:
        return self.weight is not None and self.kind != "norm" and self.groups == 1


@dataclass
class Analysis:
    layers: list[Layer]
    fallback: list[str]  # selected parameters left to per-example Jacobians
    p_fallback: int
    flops: float  # forward multiply-adds per point (estimate)


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_final: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def analyze(lin: Linearized, x: Tensor) -> Analysis:
    """Which selected parameters are handled by which layer rule (cached per ``lin``).

    Two forwards of the private copy on 1 and 3 copies of x[0] record each module's calls and
    input/output shapes; a layer qualifies when it is called once and maps point-major inputs
    (n, ...) to point-major outputs.
    """
    if lin in _cache:
        return _cache[lin]
    module, mods = lin.module, list(lin.module.modules())
    calls: dict[int, list] = defaultdict(list)

    def hook(m, inp, out):
        i = inp[0] if inp and isinstance(inp[0], Tensor) else None
        o = out if isinstance(out, Tensor) else None
        calls[id(m)].append((None if i is None else tuple(i.shape), None if o is None else tuple(o.shape)))

    probes = []
    with lin._session():  # the hooks live on the shared private copy: hold its lock
        handles = [m.register_forward_hook(hook) for m in mods]
        try:
            with torch.no_grad():
                for b in (1, 3):
                    calls.clear()
                    lin.function(inputs.repeat_first(x, b))(lin.theta_dict())
                    probes.append({key: list(v) for key, v in calls.items()})
        finally:
            for h in handles:
                h.remove()
    owners: dict[int, list] = defaultdict(list)
    for m in mods:
        for attr, p in m._parameters.items():
            if p is not None:
                owners[id(p)].append((m, attr))
    layers: dict[int, Layer] = {}
    fallback = []
    for name in lin.names:
        own = owners.get(id(module.get_parameter(name)), [])
        layer = _layer(own[0][0], probes) if len(own) == 1 and own[0][1] in ("weight", "bias") else None
        if layer is None:
            fallback.append(name)
            continue
        layer = layers.setdefault(id(layer.module), layer)
        setattr(layer, own[0][1], name)
    an = Analysis(list(layers.values()), fallback, 0, 0.0)
    _verify(lin, an, x)
    flops = 0.0
    for m in mods:
        for i_shape, o_shape in probes[0].get(id(m), []):
            flops += _flops(m, i_shape, o_shape)
    an.p_fallback = sum(n for name, n in zip(lin.names, lin.numels) if name in set(an.fallback))
    an.flops = max(flops, float(lin.num_params))
    _cache[lin] = an
    return an


def _verify(lin: Linearized, an: Analysis, x: Tensor) -> None:
    """Move to the fallback every parameter whose layer-rule gradient disagrees with autograd (e.g.
    a weight also used outside its module): one random-cotangent backward on 3 copies of x[0]."""
    names = [n for L in an.layers for n in (L.weight, L.bias) if n]
    if not names:
        return
    x3 = inputs.repeat_first(x, 3)
    u = torch.randn(1, 3, lin.num_outputs, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = u.to(dtype=lin.dtype, device=lin.device)
    X = features(lin, an, ["explicit"] * len(an.layers), u, x3)[0].sum(0)[0]
    theta = {n: t.detach().requires_grad_(n in set(names)) for n, t in lin.theta_dict().items()}
    with torch.enable_grad(), lin._session():
        y = lin.function(x3)(theta)
        true = torch.autograd.grad((y * u[0]).sum(), [theta[n] for n in names], allow_unused=True)
    eps, off, bad = torch.finfo(lin.dtype).eps, 0, set()
    for n, t in zip(names, true):
        q = theta[n].numel()
        got, ref = X[off : off + q], (torch.zeros_like(X[:q]) if t is None else t.reshape(-1))
        off += q
        if float((got - ref).norm()) > 100 * eps**0.5 * float(ref.norm() + got.norm()) + 1e-30:
            bad.add(n)
    if bad:
        for L in an.layers:
            L.weight = None if L.weight in bad else L.weight
            L.bias = None if L.bias in bad else L.bias
        an.layers = [L for L in an.layers if L.weight or L.bias]
        an.fallback = [n for n in lin.names if n in set(an.fallback) | bad]


def _layer(m: nn.Module, probes: list[dict]) -> Layer | None:
    kind = _KINDS.get(type(m))
    c1, c3 = probes[0].get(id(m), []), probes[1].get(id(m), [])
    if kind is None or len(c1) != 1 or len(c3) != 1 or None in c1[0] or None in c3[0]:
        return None
    (i1, o1), (i3, o3) = c1[0], c3[0]
    if i1[:1] != (1,) or o1[:1] != (1,) or i3 != (3, *i1[1:]) or o3 != (3, *o1[1:]) or len(o1) < 2:
        return None
    if kind == "linear":
        return Layer(m, kind, S=math.prod(i1[1:-1]), d_in=i1[-1], d_out=o1[-1])
    if kind == "conv":
        if len(i1) != (3 if isinstance(m, nn.Conv1d) else 4):
            return None
        d_in = m.in_channels // m.groups * math.prod(m.kernel_size)
        return Layer(m, kind, S=math.prod(o1[2:]), d_in=d_in, d_out=m.out_channels, groups=m.groups)
    if kind == "embedding":
        if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
            return None
        return Layer(m, kind, S=math.prod(i1[1:]), d_in=m.num_embeddings, d_out=m.embedding_dim)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
        not m.track_running_stats or m.running_mean is None or m.running_var is None
    ):
        return None  # batch statistics even in eval: points interact
    c = m.weight.numel() if m.weight is not None else m.bias.numel()
    return Layer(m, kind, S=math.prod(o1[1:]) // c, d_in=1, d_out=c)


def _flops(m: nn.Module, i_shape, o_shape) -> float:
    if o_shape is None:
        return 0.0
    kind = _KINDS.get(type(m))
    if kind == "linear" and i_shape:
        return float(math.prod(o_shape) * i_shape[-1])
    if kind == "conv":
        return float(math.prod(o_shape) * m.in_channels // m.groups * math.prod(m.kernel_size))
    if next(m.children(), None) is not None:
        return 0.0  # a container: its children are counted
    return float(math.prod(o_shape) + sum(p.numel() for p in m.parameters(recurse=False)))


# ---------------------------------------------------------------------------------- features
def features(
    lin: Linearized, an: Analysis, modes: list[str], E: Tensor, x: Tensor,
    fb: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """[X (b, k', Q) explicit per-example gradients, then (a, G) per factored layer] for x (b, ...)
    and output cotangents E (k', b, k) (one-hot rows select the outputs).

    Holds ``lin``'s lock while its temporary hooks are on the private copy; the k' backward
    passes are batched unless the probes found the batched pull-back wrong (``capabilities.vjp``)."""
    with lin._session():
        return _features(lin, an, modes, E, x, fb)


def _features(lin, an, modes, E, x, fb):
    b, kk = x.shape[0], E.shape[0]
    rec: dict[int, tuple[Tensor, Tensor]] = {}
    kinds = {id(L.module): L.kind for L in an.layers}

    def hook(m, inp, out):
        a = inp[0].detach()
        rec[id(m)] = (_normalized(m, a) if kinds[id(m)] == "norm" else a, out)
        return out.clone()  # later in-place ops must not change the tensor we differentiate by

    req = {n for L in an.layers for n in (L.weight, L.bias) if n}
    theta = {n: t.detach().requires_grad_(n in req) for n, t in lin.theta_dict().items()}
    parts: list[Tensor] = []
    kron: list[Tensor] = []
    if an.layers:
        handles = [L.module.register_forward_hook(hook) for L in an.layers]
        try:
            with torch.enable_grad():
                y = lin.function(x)(theta)
        finally:
            for h in handles:
                h.remove()
        outs = [rec[id(L.module)][1] for L in an.layers]
        if any(o.shape[0] != b for o in outs):
            raise RuntimeError("a layer's output is not point-major for this input; use method='contraction'")
        with torch.enable_grad():
            if kk == 1 or lin.capabilities.vjp == "loop":
                cols = [torch.autograd.grad(y, outs, E[c], allow_unused=True, retain_graph=c < kk - 1)
                        for c in range(kk)]
                grads = [None if cols[0][i] is None else torch.stack([col[i] for col in cols])
                         for i in range(len(outs))]
            else:
                grads = torch.autograd.grad(y, outs, E, is_grads_batched=True, allow_unused=True)
        for L, m, g, o in zip(an.layers, modes, grads, outs):
            g = o.new_zeros(kk, *o.shape) if g is None else g.detach()
            _layer_features(L, m, rec[id(L.module)][0], g, parts, kron)
        del y, outs, grads, rec
    if fb is not None:
        parts.append(fb(x))
    X = torch.cat(parts, -1) if parts else torch.zeros(b, kk, 0, dtype=lin.dtype, device=lin.device)
    return [X, *kron]


def _normalized(m: nn.Module, a: Tensor) -> Tensor:
    """x̂, the normalized input before the affine map (eval semantics)."""
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(a, m.num_groups, None, None, m.eps)
    return F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


def _layer_features(L: Layer, mode: str, a: Tensor, g: Tensor, parts: list, kron: list) -> None:
    kk, b = g.shape[:2]
    if L.kind == "norm":
        lead = (kk, b, L.d_out, -1) if not isinstance(L.module, nn.LayerNorm) else (kk, b, -1, L.d_out)
        red = 3 if not isinstance(L.module, nn.LayerNorm) else 2
        if L.weight:
            parts.append((g * a).reshape(lead).sum(red).transpose(0, 1))
        if L.bias:
            parts.append(g.reshape(lead).sum(red).transpose(0, 1))
        return
    if L.kind == "conv":
        A = _patches(L.module, a)
        G = g.reshape(kk, b, L.d_out, -1).permute(1, 0, 3, 2)  # (b, k', S, d_out)
    else:
        A = a.reshape(b, -1) if L.kind == "embedding" else a.reshape(b, -1, L.d_in)
        G = g.reshape(kk, b, -1, L.d_out).transpose(0, 1)
    if L.kind == "embedding" and L.module.padding_idx is not None:
        G = G * (A != L.module.padding_idx)[:, None, :, None]
    if L.weight and mode == "kron":
        if L.bias:
            A = torch.cat([A, A.new_ones(*A.shape[:2], 1)], -1)
        kron += [A, G]
        return
    if L.weight and L.kind == "embedding":
        X = G.new_zeros(b, kk, L.d_in, L.d_out)
        X.scatter_add_(2, A[:, None, :, None].expand(b, kk, A.shape[1], L.d_out), G)
        parts.append(X.reshape(b, kk, -1))
    elif L.weight:
        S, gr = A.shape[1], L.groups
        X = torch.einsum("bsgi,bcsgo->bcgoi", A.reshape(b, S, gr, -1), G.reshape(b, kk, S, gr, -1))
        parts.append(X.reshape(b, kk, -1))
    if L.bias:
        parts.append(G.sum(2))


def _patches(m: nn.Module, a: Tensor) -> Tensor:
    """Input patches (b, S, C_in·prod(kernel)), in the weight's (C_in, *kernel) order.

    Strided windows (``Tensor.unfold``; far faster than ``F.unfold`` on CPU), one copy at the end.
    """
    pad = m._reversed_padding_repeated_twice
    a = F.pad(a, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    for axis, (k, s, d) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
        a = a.unfold(2 + axis, (k - 1) * d + 1, s)[..., ::d]
    nd = len(m.kernel_size)  # a: (b, C, *out_spatial, *kernel)
    b, C = a.shape[:2]
    perm = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return a.permute(perm).reshape(b, math.prod(a.shape[2 : 2 + nd]), -1)


# ---------------------------------------------------------------------------------- final layer
@dataclass(frozen=True)
class FinalLinear:
    """The selected parameters are exactly those of one exact-type ``nn.Linear`` whose output is
    the model's output: f(x; W, b) = W φ(x) + b with φ (d_in features) fixed, so that
    J(x) = I_k ⊗ φ̃(x)ᵀ, φ̃ = [φ, 1] (the 1 when the bias is selected), in the parameter order
    [W (k × d_in, row-major), b (k)]. ``module``: its name in ``lin.module``."""

    module: str
    weight: str
    bias: str | None
    d_in: int
    k: int


def final_linear(lin: Linearized, x: Tensor) -> FinalLinear | None:
    """The :class:`FinalLinear` structure of ``lin``'s selection, or None (cached per ``lin``).

    Found by :func:`analyze` (one layer rule covers every selected parameter: an exact-type
    ``nn.Linear`` called once on point-major (n, d_in) inputs) and verified on the probe batch of
    the first call: the layer's output equals f(x) exactly, and J(x)ᵀU from the layer rule
    (U φᵀ, ΣU) agrees with the validated vjp for random U (the probes' tolerance), which also
    catches a weight used elsewhere in the forward (φ would depend on it)."""
    if lin in _final:
        return _final[lin]
    out = _find_final(lin, x)
    _final[lin] = out
    return out


def _find_final(lin: Linearized, x: Tensor) -> FinalLinear | None:
    an = analyze(lin, x)
    if an.fallback or len(an.layers) != 1:
        return None
    L = an.layers[0]
    if L.kind != "linear" or L.S != 1 or L.weight is None:
        return None
    if lin.names != [n for n in (L.weight, L.bias) if n]:
        return None
    name = next(n for n, m in lin.module.named_modules() if m is L.module)
    info = FinalLinear(name, L.weight, L.bias, L.d_in, L.d_out)
    xb = lin._probe_x
    try:
        phi, out = final_inputs(lin, info, xb)
    except (RuntimeError, ValueError):
        return None
    f = streaming.forward_outputs(lin, xb)  # the chunks and layout of final_inputs
    if out.shape != f.shape or not torch.equal(out, f) or phi.shape != (xb.shape[0], L.d_in):
        return None
    U = torch.randn(xb.shape[0], f.shape[1], 2, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64).to(f)
    rule = [torch.einsum("nkr,nd->rkd", U, phi).reshape(2, -1)]
    if info.bias:
        rule.append(U.sum(0).T)
    ok, _ = close(torch.cat(rule, 1).T, lin.vjp_block(xb, U), tolerance(lin.dtype))
    return info if ok else None


def final_inputs(lin: Linearized, info: FinalLinear, x: Tensor) -> tuple[Tensor, Tensor]:
    """(φ(x) (n, d_in), f(x) (n, k)): the final layer's inputs and outputs on checked x, from
    forwards of the private copy with a temporary hook on that layer (:func:`.streaming.forward_pass`)."""
    module = lin.module.get_submodule(info.module)
    rec: list[tuple[Tensor, Tensor]] = []

    def hook(_m, inp, out):
        rec.append((inp[0].detach(), out.detach()))

    parts, theta = streaming.forward_pass(lin, x)
    with lin._session(grad=False):  # the hook lives on the shared private copy: hold its lock
        handle = module.register_forward_hook(hook)
        try:
            for xp in parts:
                lin.function(xp)(theta)
        finally:
            handle.remove()
    if len(rec) != len(parts):
        raise RuntimeError(f"the final layer {info.module!r} was not called once per forward")
    phi = torch.cat([a.reshape(a.shape[0], -1) for a, _ in rec])
    return phi, torch.cat([o.reshape(o.shape[0], -1) for _, o in rec])
