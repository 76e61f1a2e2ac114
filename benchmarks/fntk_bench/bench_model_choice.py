"""The cost of NTKRegressor's automatic model choice against one plain fit.

On a heteroscedastic 2-500-500-2 tanh MLP (the malaria source architecture, p = 252,502, float32
network, float64 GP algebra) with n = 100 … 2,000 random training points (smooth targets), times

- ``plain``: ``NTKRegressor(net, mean="network")``, the plain NTK-GP (one eigendecomposition, its
  evidence search);
- ``auto``: ``NTKRegressor(net, variance_output=1)``, the default: the six candidates of
  :func:`fntk.gp.default_candidates` (three spectral, three composite with one Cholesky per
  evidence evaluation), hyperpriors, the leave-one-out and Laplace scores;
- ``auto (spectral only)``: the three spectral candidates (what the default fits above 2,000 points);
- one fit of each composite candidate on its own,

each fit including the NTK of the n points (fntk.ntk, structured: the same work in every column)
and the prediction of 50 test points. Best of ``--repeats``. Writes the "Model choice: cost"
section of benchmarks/RESULTS.md.

    python -m fntk_bench.bench_model_choice [--quick] [--repeats R]
"""

from __future__ import annotations

import argparse
import time

import torch

from fntk.gp import NTKRegressor, default_candidates
from fntk_bench.common import machine_note, mlp, write_section

SECTION = "Model choice: cost"
NS = (100, 500, 1000, 2000)


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g)
    y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + 0.1 * torch.randn(n, generator=g)
    return x, y, torch.rand(50, 2, generator=g)


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 100, 500 and one repeat")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ns, repeats = (NS[:2], 1) if args.quick else (NS, args.repeats)
    net = mlp([2, 500, 500, 2])
    spectral = [m.name for m in default_candidates(True) if m.spectral]
    composite = [m.name for m in default_candidates(True) if not m.spectral]
    cols = ["plain", "auto", "auto (spectral only)", *composite]
    lines = ["| n | " + " | ".join(f"{c} (s)" for c in cols) + " | auto / plain | chosen |",
             "|---|" + "---|" * (len(cols) + 2)]
    for n in ns:
        x, y, xt = _data(n)
        chosen: list[str] = []

        def fit(x=x, y=y, xt=xt, chosen=chosen, **kw) -> None:
            reg = NTKRegressor(net, output=0, **kw).fit(x, y)
            reg.predict(xt)
            if not kw.get("gp_model") and not kw.get("mean"):
                chosen.append(reg.model_)

        times = {"plain": _time(lambda: fit(mean="network"), repeats),
                 "auto": _time(lambda: fit(variance_output=1), repeats),
                 "auto (spectral only)": _time(lambda: fit(gp_model=spectral), repeats)}
        for name in composite:
            times[name] = _time(lambda name=name: fit(gp_model=name, variance_output=1, hyperprior=True),
                                repeats)
        cells = [f"{times[c]:.3g}" for c in cols]
        lines.append(f"| {n:,} | " + " | ".join(cells) + f" | {times['auto'] / times['plain']:.1f}x | "
                     f"{chosen[-1]} |")
        print(lines[-1], flush=True)
    intro = ("Seconds per fit + predict(50 points), NTK included, best of "
             f"{repeats}: the plain NTK-GP (`mean=\"network\"`), the default choice over the six candidates "
             "(`variance_output=1`), the choice over the three spectral ones, and each composite candidate "
             "alone; a 2-500-500-2 tanh MLP (p = 252,502), one thread.")
    command = "python -m fntk_bench.bench_model_choice" + (" --quick" if args.quick else "")
    body = intro + "\n\n" + "\n".join(lines) + "\n\n" + machine_note() + f" Command: `{command}`."
    write_section(SECTION, body)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
