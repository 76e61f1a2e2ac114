r"""Capability probes: which autodiff paths give correct numbers for this model, checked once on a
small probe batch (b ≤ 3 points) and cached on the :class:`~fntk.Linearized`.

Nothing is trusted blindly. The reference is plain ``torch.autograd`` (no vmap, no functorch):
G = J(x)ᵀU for random U (b, k, 2). Against it the probe checks, in this order:

1. **points are independent**: f(x)[i] = f(x[i:i+1]) for every probe point, and
   Σ_i J(x_i)ᵀu_i (one-point batches) = J(x)ᵀu; otherwise the model is refused (every kernel,
   per-example Jacobian and chunked product assumes it), naming the first module where the rows
   differ;
2. **vjp**: the vmapped pull-back of :func:`~fntk.linearize.engine.vjp_columns` equals G, else
   ``"loop"`` (plain autograd per column);
3. **jvp**: a randomised adjoint test Uᵀ(J V) = (JᵀU)ᵀV with V (p, 2), first for forward mode,
   then for reverse-over-reverse (``"double_vjp"``); if neither passes, J V is formed from
   per-example rows (``"rows"``);
4. **rows**: per-example Jacobian rows R (on the first ≤ :data:`K_PROBE` outputs) agree with the
   batch: Σ_ic R_ic u_ic = Jᵀu and R v = J v; first nested vmap, then one vmap over cotangent
   basis vectors, else the plain-autograd ``"loop"``.

Second-order paths of the GGN operator (fused vjp-of-jvp, Hessian-vector products, gradients at
several parameter values) are probed the same way the first time they are needed
(:func:`probe_second_order`). A faster path that raised or disagreed is recorded in
``Capabilities.rejected`` with the reason. Agreement means ‖a − b‖ ≤ tol (‖a‖ + ‖b‖) with
tol = min(0.05, 100 ε^¾) for the model's dtype (1.8e-10 in float64, 6.3e-4 in float32): far
above rounding, far below what a wrong batching rule gives (1e-2 and more, measured).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fntk.linearize import engine, fallbacks
from fntk.linearize.outputs import OutputFn
from fntk.linearize.private import describe

PROBE_POINTS = 3
K_PROBE = 4  # outputs whose per-example rows are probed (all when k ≤ K_PROBE)


@dataclass
class Capabilities:
    """What the probes validated for one :class:`~fntk.Linearized` (``lin.capabilities``).

    Attributes:
        jvp: how J V is computed: ``"forward"`` (forward mode), ``"double_vjp"``
            (reverse-over-reverse) or ``"rows"`` (from per-example Jacobian rows).
        vjp: how Jᵀ U is computed: ``"vmap"`` (one pull-back vmapped over columns) or ``"loop"``.
        rows: how per-example Jacobian rows are computed: ``"nested_vmap"``, ``"cotangent_vmap"``
            (one vmap over cotangent basis vectors of a batched vjp) or ``"loop"``.
        forward_mode: whether forward-mode AD gave correct J V on the probe.
        independent: points do not interact (always True: coupled models are refused).
        checkpoint: the forward used ``torch.utils.checkpoint`` (run directly; see ``scope``).
        ggn, hvp, grad: second-order paths of the GGN operator, probed on first use (None before):
            ggn ``"fused"``/``"composed"``, hvp ``"forward_over_reverse"``/
            ``"reverse_over_reverse"``/``"loop"``, grad ``"vmap"``/``"loop"``; ``"unavailable"``
            when even plain autograd cannot (e.g. an op without a double backward).
        points: probe batch size; seconds: time the probes took; units: that time in forward+
            backward passes of the probe batch.
        layout: the memory format of image batches in forward-only passes, probed on first use
            (None before): ``"channels_last"`` or ``"standard"`` (see
            :func:`fntk.linearize.streaming.channels_last`).
        rejected: faster paths that raised or disagreed, with the reason.
    """

    jvp: str
    vjp: str
    rows: str
    forward_mode: bool
    independent: bool = True
    checkpoint: bool = False
    ggn: str | None = None
    hvp: str | None = None
    grad: str | None = None
    points: int = 0
    seconds: float = 0.0
    units: float = 0.0
    rejected: dict[str, str] = field(default_factory=dict)
    layout: str | None = None


@dataclass
class Target:
    """The pieces of a linearized model the probes evaluate (those of a ``Linearized``)."""

    module: nn.Module
    fixed: dict[str, Tensor]
    theta: dict[str, Tensor]
    names: list[str]
    shapes: list[torch.Size]
    output_fn: OutputFn | None
    keep: Tensor | None  # (p,) 1 for differentiable entries, 0 for autograd-frozen ones
    no_forward: str | None = None  # why forward mode is not an option for this model

    def project(self, V: Tensor) -> Tensor:
        """The input of a forward-mode product (autograd-frozen entries zeroed)."""
        return V if self.keep is None else V * self.keep[:, None]

    def f(self, x: Tensor) -> engine.PureF:
        return engine.model_function(self.module, self.fixed, x, self.output_fn)

    def flat(self, d: dict[str, Tensor], lead: int = 0) -> Tensor:
        return engine.flatten(d, self.names, lead)

    def dict_(self, v: Tensor) -> dict[str, Tensor]:
        return engine.unflatten(v, self.names, self.shapes)


def tolerance(dtype: torch.dtype) -> float:
    return min(0.05, 100 * torch.finfo(dtype).eps ** 0.75)


def close(a: Tensor, b: Tensor, tol: float) -> tuple[bool, float]:
    """(‖a − b‖ ≤ tol (‖a‖ + ‖b‖), relative difference)."""
    if a.shape != b.shape:
        return False, math.inf
    diff, scale = float((a - b).norm()), float(a.norm() + b.norm())
    if not math.isfinite(diff):
        return False, math.inf
    return diff <= tol * scale + 1e-300, diff / max(scale, 1e-300)


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


# ---------------------------------------------------------------------------------- refusals
def _coupling_site(t: Target, x: Tensor, tol: float) -> str:
    """Where row 0 of a batch first differs from point 0 alone: the module whose input row agrees
    but whose output row differs, or the forward code before the first module whose input row
    differs (hooks on the private copy, removed again)."""
    names = {id(m): n for n, m in t.module.named_modules()}
    records: list[list] = [[], []]
    run = [0]

    def first(obj):
        if isinstance(obj, (tuple, list)):
            obj = next((o for o in obj if isinstance(o, Tensor)), None)
        return obj if isinstance(obj, Tensor) else None

    def pre(m, inp):
        records[run[0]].append([names.get(id(m), "?"), first(inp), None])

    def post(m, inp, out):
        for rec in reversed(records[run[0]]):
            if rec[0] == names.get(id(m), "?") and rec[2] is None:
                rec[2] = first(out)
                break

    handles = [h for m in t.module.modules()
               for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            for i, xs in enumerate((x, x[:1])):
                run[0] = i
                t.f(xs)(t.theta)
    except Exception:  # noqa: BLE001 (only a description)
        return "at an unknown place"
    finally:
        for h in handles:
            h.remove()

    def same(a, b) -> bool:
        if a is None or b is None or not a.dim() or a.shape[0] != x.shape[0] or a.shape[1:] != b.shape[1:]:
            return True  # not comparable as rows
        return close(a[:1].to(torch.float64), b[:1].to(torch.float64), tol)[0]

    recs = [(n, same(ib, i1), same(ob, o1)) for (n, ib, ob), (_, i1, o1) in zip(*records)]

    def site(name: str) -> str:
        top = f"in the forward code of {describe(t.module, '')}"
        return f"in module {describe(t.module, name)}" if name else top

    def inside(a: str, b: str) -> bool:  # b is a or one of its submodules
        return a == "" or b == a or b.startswith(a + ".")

    bad_in = next((i for i, r in enumerate(recs) if not r[1]), None)
    if bad_in is not None:
        name = recs[bad_in][0]
        done = [r for r in recs[:bad_in] if r[1] and not r[2] and not inside(r[0], name)]
        if done:
            return site(done[-1][0])
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        return f"in the forward code of {describe(t.module, parent)}, before it calls {name!r}"
    culprits = [r for r in recs if r[1] and not r[2]]
    return site(culprits[-1][0] if culprits else "")


def _coupled(t: Target, x: Tensor, what: str, rel: float, tol: float) -> ValueError:
    return ValueError(
        f"the model couples the points of a batch: {what} (relative difference {rel:.2g}), first "
        f"{_coupling_site(t, x, tol)}. fntk needs each output row f(x)[i] to depend on x[i] "
        "alone (kernels, per-example Jacobians and chunked products all assume it); usual causes "
        "are statistics over the batch axis (x - x.mean(0), BatchNorm with "
        "track_running_stats=False, which uses batch statistics even in eval mode) or attention "
        "across the batch axis (batch_first mismatch): compute them per point"
    )


# ---------------------------------------------------------------------------------- the probes
def _recording(f: engine.PureF) -> tuple[engine.PureF, list[Tensor]]:
    """f, and a list that receives its outputs (one forward gives both the value and the vjp)."""
    seen: list[Tensor] = []

    def g(theta):
        seen.append(f(theta))
        return seen[-1]

    return g, seen


def probe(t: Target, x: Tensor) -> Capabilities:
    """Run the first-order probes on the checked probe batch x (b, ...) (see the module doc).

    Raises ValueError for a model with no correct path (coupled points, no reverse mode)."""
    start = time.perf_counter()
    tol = tolerance(next(iter(t.theta.values())).dtype)
    rejected: dict[str, str] = {}
    f, th = t.f(x), t.theta
    with torch.no_grad():
        y = f(th)
    b, k = y.shape
    g = torch.Generator().manual_seed(0)
    rdt = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    U = torch.randn(b, k, 2, generator=g, dtype=rdt).to(y)
    sel = None if k <= K_PROBE else list(range(K_PROBE))
    if sel is not None:  # column 1 only on the probed outputs (for the row check)
        U[:, K_PROBE:, 1] = 0
    p = sum(s.numel() for s in t.shapes)
    V = torch.randn(p, 2, generator=g, dtype=rdt).to(y)  # not projected: see Target.project
    try:
        t0 = time.perf_counter()
        G0 = t.flat(fallbacks.loop_vjp(f, th, U[..., :1]), lead=1).T
        unit = time.perf_counter() - t0
        G = torch.cat([G0, t.flat(fallbacks.loop_vjp(f, th, U[..., 1:]), lead=1).T], 1)  # (p, 2)
    except Exception as err:
        raise ValueError(
            "the model cannot be differentiated by torch.autograd in its selected parameters (the "
            f"reference backward pass failed with {_reason(err)}); fntk needs reverse-mode autograd "
            "through the forward"
        ) from err
    per_point = torch.zeros_like(G[:, 0])
    for i in range(b):  # 1. outputs and Jacobians of one-point batches equal the batch's rows
        f_i, seen = _recording(t.f(x[i : i + 1]))
        per_point += t.flat(fallbacks.loop_vjp(f_i, th, U[i : i + 1, :, :1]), lead=1)[0]
        ok, rel = close(seen[0][0].detach(), y[i], tol)
        if not ok:
            raise _coupled(t, x, f"output row {i} of a batch of {b} points differs from the output for "
                           f"that point alone", rel, tol)
    ok, rel = close(per_point, G[:, 0], tol)
    if not ok:
        raise _coupled(t, x, f"the Jacobians of one-point batches differ from the rows of the Jacobian "
                       f"of a batch of {b} points", rel, tol)
    vjp_mode = "loop"  # 2. vjp
    try:
        ok, rel = close(t.flat(engine.vjp_columns(f, th, U, "vmap"), lead=1).T, G, tol)
        vjp_mode = "vmap" if ok else vjp_mode
        if not ok:
            rejected["vjp:vmap"] = f"disagrees with autograd by {rel:.2g}"
    except Exception as err:  # noqa: BLE001 (any failure of a transform means: not this path)
        rejected["vjp:vmap"] = _reason(err)
    jvp_mode, JV = "rows", None  # 3. jvp, by the adjoint test
    if t.no_forward:
        rejected["jvp:forward"] = t.no_forward
    for mode in ("double_vjp",) if t.no_forward else ("forward", "double_vjp"):
        try:
            out = engine.jvp_columns(f, th, t.dict_((t.project(V) if mode == "forward" else V).T), mode)
            ok, rel = close(torch.einsum("nkr,nks->rs", U, out), G.T @ V, tol)
        except Exception as err:  # noqa: BLE001
            rejected[f"jvp:{mode}"] = _reason(err)
            continue
        if ok:
            jvp_mode, JV = mode, out
            break
        rejected[f"jvp:{mode}"] = f"fails the adjoint test uᵀ(Jv) = (Jᵀu)ᵀv by {rel:.2g}"
    rows_mode = "loop"  # 4. per-example rows
    for mode in ("nested_vmap", "cotangent_vmap"):
        try:
            R = engine.per_example_jacobian(t.module, t.fixed, th, t.names, k, sel, False, mode,
                                            t.output_fn)(x)
            Us = U[:, :, 1] if sel is None else U[:, sel, 1]
            ok, rel = close(R.reshape(-1, p).T @ Us.reshape(-1), G[:, 1], tol)
            if ok and JV is not None:
                ok, rel = close(R @ V[:, 0], JV[:, :, 0] if sel is None else JV[:, sel, 0], tol)
        except Exception as err:  # noqa: BLE001
            rejected[f"rows:{mode}"] = _reason(err)
            continue
        if ok:
            rows_mode = mode
            break
        rejected[f"rows:{mode}"] = f"disagrees with the batch's vjp/jvp by {rel:.2g}"
    seconds = time.perf_counter() - start
    return Capabilities(jvp=jvp_mode, vjp=vjp_mode, rows=rows_mode, forward_mode=jvp_mode == "forward",
                        points=b, seconds=seconds, units=seconds / max(unit, 1e-9), rejected=rejected)


def probe_second_order(t: Target, x: Tensor, caps: Capabilities, what: str,
                       jvp: Callable[[Tensor], Tensor], vjp: Callable[[Tensor], Tensor]) -> str:
    """Probe (once) and record in ``caps`` the path for ``what`` ("ggn", "hvp" or "grad").

    ``jvp``/``vjp``: the validated J V (p, r) → (b, k, r) and Jᵀ U (b, k, r) → (p, r) on x."""
    current = getattr(caps, what)
    if current is not None:
        return current
    tol = tolerance(next(iter(t.theta.values())).dtype)
    f, th = t.f(x), t.theta
    g = torch.Generator().manual_seed(1)
    p = sum(s.numel() for s in t.shapes)
    dt = next(iter(th.values()))
    rdt = dt.dtype if dt.dtype in (torch.float32, torch.float64) else torch.float32
    V = torch.randn(p, 2, generator=g, dtype=rdt).to(dt)
    if what == "ggn":  # Jᵀ(J V) fused against the validated products
        ref, cands = vjp(jvp(V)), ["fused"] if caps.jvp == "forward" else []
        run = {"fused": lambda m: t.flat(engine.ggn_columns(f, th, t.dict_(t.project(V).T), lambda u: u),
                                         lead=1).T}
        fallback = "composed"
    else:
        def loss(theta):
            out = f(theta)
            return (out.sin() * out).sum()  # non-quadratic, so second derivatives of f count too

        def cols(fn) -> Callable[[str], Tensor]:
            return lambda m: t.flat(fn(m), lead=1).T

        try:
            if what == "hvp":
                ref = t.flat(fallbacks.loop_hvp(loss, th, t.dict_(V.T)), lead=1).T
                cands = ["forward_over_reverse", "reverse_over_reverse"]
                def hvp(m):
                    W = t.project(V) if m == "forward_over_reverse" else V
                    return engine.hvp_columns(loss, th, t.dict_(W.T), m)

                run = {m: cols(hvp) for m in cands}
            else:
                steps = t.dict_(1e-3 * V.T)
                ref = t.flat(fallbacks.loop_grad_at(loss, th, steps), lead=1).T
                cands, run = ["vmap"], {"vmap": cols(lambda m: engine.grad_columns(loss, th, steps))}
        except Exception as err:  # noqa: BLE001 (plain autograd itself cannot do it: no path)
            caps.rejected[f"{what}:loop"] = _reason(err)
            setattr(caps, what, "unavailable")
            return "unavailable"
        fallback = "loop"
    chosen = fallback
    for mode in cands:
        try:
            ok, rel = close(run[mode](mode), ref, tol)
        except Exception as err:  # noqa: BLE001
            caps.rejected[f"{what}:{mode}"] = _reason(err)
            continue
        if ok:
            chosen = mode
            break
        caps.rejected[f"{what}:{mode}"] = f"disagrees with autograd by {rel:.2g}"
    setattr(caps, what, chosen)
    return chosen


__all__ = ["Capabilities", "Target", "probe", "probe_second_order", "tolerance", "close",
           "PROBE_POINTS", "K_PROBE"]
