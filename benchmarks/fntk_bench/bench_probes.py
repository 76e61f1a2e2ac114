"""Capability probes and fallbacks (issue 14): what the probes cost, and what each fallback costs
against its fast path.

1. Probe cost on LeNet-5 (648,226 parameters, 10 outputs) and a small text transformer
   (Embedding + 2-layer TransformerEncoder with a padding mask): the seconds a fresh
   ``Linearized``'s first call spends in the probes, in units of one forward+backward pass of the
   probe batch (``capabilities.units``) and against the first call's forward alone.
2. Fallback against fast path, on models where both are valid (the path forced through
   ``lin.capabilities``, the same numbers checked): J V (forward mode / reverse-over-reverse /
   from rows), Jᵀ U (vmap / loop), per-example rows (nested vmap / cotangent basis / loop), and the
   GGN operator's second-order paths; and the rows fallback of an LSTM (no nested vmap) against
   the same-size GRU-free MLP's fast path for scale.

    python -m fntk_bench.bench_probes [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn

import fntk
from fntk.data.nets import LeNet5
from fntk.likelihoods import Categorical
from fntk_bench.common import best_time, machine_note, write_section


class TextTransformer(nn.Module):
    """Embedding (padding 0) + TransformerEncoder (2 layers, d 64, 4 heads) + masked mean + head."""

    def __init__(self, vocab: int = 1000, d: int = 64, k: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 128, batch_first=True), 2)
        self.fc = nn.Linear(d, k)

    def forward(self, t):
        pad = t == 0
        h = self.enc(self.emb(t), src_key_padding_mask=pad)
        keep = (~pad).to(h.dtype)[..., None]
        return self.fc((h * keep).sum(1) / keep.sum(1))


def tokens(n: int, L: int = 32, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, vocab, (n, L), generator=g)
    for i in range(n):
        t[i, L - 1 - (3 * i) % (L // 2) :] = 0
    return t


@contextlib.contextmanager
def forced(lin: fntk.Linearized, **modes):
    """Run with the given capability modes (benchmark only: bypasses the probes' choice)."""
    caps = lin.capabilities
    old = {k: getattr(caps, k) for k in modes}
    for k, v in modes.items():
        setattr(caps, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(caps, k, v)


def probe_cost(make, x, repeats: int) -> dict:
    """Seconds of the probes on a fresh Linearized (best of ``repeats``), their units, and the
    first call's forward on the same probe batch for scale."""
    secs, units = [], []
    for _ in range(repeats):
        lin = fntk.Linearized(make())
        lin.forward(x[:3])
        secs.append(lin.capabilities.seconds)
        units.append(lin.capabilities.units)
    t_fwd = best_time(lambda: lin.forward(x[:3]), 3)
    return dict(seconds=min(secs), units=min(units), fwd=t_fwd, caps=lin.capabilities)


def compare(lin, what: str, modes: list[str], fn, repeats: int) -> list[tuple[str, float, float]]:
    """(mode, seconds, relative difference to the first mode) of ``fn()`` under each forced mode
    (seconds NaN where the mode fails on this model)."""
    out, ref = [], None
    for mode in modes:
        with forced(lin, **{what: mode}):
            try:
                val = fn()
            except Exception:  # noqa: BLE001 (a path that does not work for this model)
                out.append((mode, float("nan"), float("nan")))
                continue
            t = best_time(fn, repeats, warmup=0)
        ref = val if ref is None else ref
        out.append((mode, t, float((val - ref).norm() / ref.norm().clamp_min(1e-300))))
    return out


def fallbacks(lin, x, r: int, n_rows: int, repeats: int) -> dict[str, list]:
    p, k = lin.num_params, lin.num_outputs
    V = torch.randn(p, r, generator=torch.Generator().manual_seed(1))
    U = torch.randn(x.shape[0], k, r, generator=torch.Generator().manual_seed(2))
    res = {
        "jvp": compare(lin, "jvp", ["forward", "double_vjp", "rows"], lambda: lin.jvp(x[:n_rows], V),
                       repeats),
        "vjp": compare(lin, "vjp", ["vmap", "loop"], lambda: lin.vjp(x, U), repeats),
        "rows": compare(lin, "rows", ["nested_vmap", "cotangent_vmap", "loop"],
                        lambda: lin.jacobian(x[:n_rows]), repeats),
    }
    y = torch.arange(x.shape[0]) % k
    for what, method, modes in (("ggn", "exact", ["fused", "composed"]),
                                ("hvp", "autograd", ["forward_over_reverse", "reverse_over_reverse", "loop"]),
                                ("grad", "finite_difference", ["vmap", "loop"])):
        G = fntk.GGNOperator(lin, x, Categorical(), y=y, method=method)
        res[what] = compare(lin, what, modes, lambda G=G: G @ V, repeats)
    return res


def table(name: str, res: dict[str, list]) -> list[str]:
    lines = [f"**{name}**", "", "| product | fast path (s) | fallback (s) | fallback / fast | rel. diff |",
             "|---|---|---|---|---|"]
    for what, rows in res.items():
        fast = rows[0]
        for mode, t, err in rows[1:]:
            lines.append(f"| {what}: {mode} vs {fast[0]} | {fast[1]:.4f} | {t:.4f} | {t / fast[1]:.1f}x "
                         f"| {err:.1e} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer points and repeats; RESULTS.md untouched")
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else 3
    start = time.perf_counter()
    torch.manual_seed(0)
    warm = fntk.Linearized(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    warm.jacobian(torch.randn(3, 3))  # torch.func's one-time start-up is not the probes' cost

    lenet_x = torch.randn(64, 1, 28, 28)
    text_x = tokens(64)
    costs = {
        "LeNet-5 (p = 648,226, k = 10)": probe_cost(lambda: LeNet5().eval(), lenet_x, repeats),
        "text transformer (p = 131,204, k = 4)": probe_cost(lambda: TextTransformer().eval(), text_x,
                                                            repeats),
    }
    lines = [
        "`python -m fntk_bench.bench_probes` — float32, one thread. " + machine_note(),
        "",
        "**Probe cost** (once per `Linearized`, on its first call; best of "
        f"{repeats} fresh objects after a warm-up of torch.func):",
        "",
        "| model | probes (s) | in fwd+bwd passes of the probe batch | × the forward of those points "
        "| paths |",
        "|---|---|---|---|---|",
    ]
    for name, c in costs.items():
        caps = c["caps"]
        lines.append(f"| {name} | {c['seconds']:.3f} | {c['units']:.1f} | {c['seconds'] / c['fwd']:.0f} "
                     f"| jvp {caps.jvp}, vjp {caps.vjp}, rows {caps.rows} |")
    torch.manual_seed(0)
    lenet = fntk.Linearized(LeNet5().eval())
    lenet.forward(lenet_x[:4])
    n = 16 if args.quick else 32
    lines += ["", *table(f"LeNet-5, n = {n}, r = 8 (J V and rows on 8 points)",
                         fallbacks(lenet, lenet_x[:n], 8, 8, repeats))]
    torch.manual_seed(0)
    text = fntk.Linearized(TextTransformer().eval())
    text.forward(text_x[:4])
    lines += ["", *table(f"text transformer, n = {n}, r = 8 (J V and rows on 8 points)",
                         fallbacks(text, text_x[:n], 8, 8, repeats))]
    torch.manual_seed(0)
    lstm = fntk.Linearized(LSTMNet().eval())
    xs = torch.randn(n, 12, 8)
    lstm.forward(xs[:4])
    caps = lstm.capabilities
    rows = compare(lstm, "rows", ["nested_vmap", "cotangent_vmap", "loop"], lambda: lstm.jacobian(xs),
                   repeats)
    lines += ["", f"**LSTM (8 → 32, 12 steps, k = 10, p = {lstm.num_params:,}), per-example Jacobian of "
              f"n = {n}**: the probes pick jvp {caps.jvp}, rows {caps.rows} (float32 runs mkldnn: "
              f"{caps.rejected.get('jvp:forward', '-')[:70]}); "
              + ", ".join(f"{m} {t:.3f} s" for m, t, _ in rows) + "."]
    lines += ["", f"Total {time.perf_counter() - start:.0f} s. The planners price fallbacks with "
              "`fntk.linearize.linearized.SLOWDOWN` (per pass, relative to the fast path), set from these "
              "ratios."]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("Capability probes and fallbacks (issue 14)", body)


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.rnn = nn.LSTM(32, 32, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.rnn(self.inp(x))[0][:, -1])


if __name__ == "__main__":
    main()
