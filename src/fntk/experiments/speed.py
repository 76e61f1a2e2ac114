"""Speed: fntk's kernels, products and GP inference as ratios against in-process baselines.

Runs the studies of the benchmark scripts (the ``fntk_bench`` package, installed with fntk from
the source checkout's ``benchmarks/fntk_bench``) through their functions:

- ``products`` (``bench_products.run``): one NTK-vector product ``NTKOperator @ V`` against the
  paper code's column-by-column double-backward loop; ratio = paper / ours.
- ``ntk`` (``bench_ntk.run_cell``): the exact kernel K(x, x) by every ``fntk.ntk`` method against
  the PyTorch NTK tutorial's two recipes; ratio = tutorial contraction / method.
- ``curvature`` (``bench_curvature.run``): one GGN product G @ V (r = 1, 16) by each method;
  ratio = product time / one forward+backward (gradient) over the same data.
- ``gp`` (``bench_gp.study``): the paper's timing study, fit at fixed hyperparameters + predict
  50 test points, function vs weight space vs auto on the 5-200-2000-200-1 ELU MLP over n and on
  depth-5 ELU MLPs over width; ratio = time / the faster of the two spaces.

``--quick`` runs a reduced grid (about a minute); the full grid follows the benchmark scripts'
own grids with a per-cell cap. Nothing here writes benchmarks/RESULTS.md (the scripts' ``main``
does); results go to ``cfg.out``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fntk.experiments.common import (
    RunConfig,
    default_threads,
    finish,
    format_table,
    progress,
    pyplot,
    save_figure,
    say,
)
from fntk_bench import bench_curvature, bench_gp, bench_ntk, bench_products

METRICS = ("seconds", "ratio")
QUICK = {"products_n": 300, "ntk_n": (100,), "curvature": {"mlp": 100}, "gp_n": (300,),
         "gp_widths": (50,), "cap": 10.0, "repeats": 1, "quick": True}
FULL = {"products_n": 2000, "ntk_n": (500, 2000), "curvature": {"mlp": 2000, "cnn": 500},
        "gp_n": (300, 1000, 2000, 5000), "gp_widths": (10, 50, 200, 500, 1000), "cap": 60.0, "repeats": 3,
        "quick": False}


def load_benchmarks() -> dict[str, ModuleType]:
    """The benchmark modules by name."""
    return {"bench_products": bench_products, "bench_ntk": bench_ntk, "bench_curvature": bench_curvature,
            "bench_gp": bench_gp}


def _call(fn: Callable, *args: Any, **optional: Any) -> Any:
    """fn(*args, **the optional keyword arguments its signature accepts): the benchmark scripts
    evolve independently, and newer ones take extra knobs (``quick``, ``rounds``)."""
    accepted = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in optional.items() if k in accepted})


def _products(b: ModuleType, grid: dict) -> list[dict]:
    out = []
    for dtype in (torch.float32, torch.float64):
        r = b.run(grid["products_n"], 16, dtype, grid["repeats"])
        case = f"2-500-500-1 MLP, n={grid['products_n']}, r=16, {r['dtype']}"
        out.append({"study": "products", "case": case, "method": "NTKOperator @ V", "seconds": r["ours"],
                    "ratio": r["paper"] / r["ours"], "baseline": "paper column loop / ours"})
        out.append({"study": "products", "case": case, "method": "paper column loop", "seconds": r["paper"],
                    "ratio": 1.0, "baseline": "paper column loop / ours"})
    return out


def _ntk(b: ModuleType, grid: dict) -> list[dict]:
    out, ratio = [], {}
    torch.manual_seed(0)
    net = b.mlp([2, 500, 500, 1], dtype=torch.float64)
    for n in grid["ntk_n"]:
        x = torch.randn(n, 2, dtype=torch.float64)
        rows = _call(b.run_cell, "MLP 2-500-500-1", net, x, "full", grid["cap"], ratio, quick=grid["quick"])
        ref = rows.get("tutorial contraction", {}).get("t")
        for method, r in rows.items():
            if "t" not in r:
                continue
            out.append({"study": "ntk", "case": f"2-500-500-1 MLP K(x, x), n={n}", "method": method,
                        "seconds": r["t"], "ratio": ref / r["t"] if ref else math.nan,
                        "baseline": "tutorial contraction / method", "error": r.get("err")})
    return out


def _curvature(b: ModuleType, grid: dict) -> list[dict]:
    out = []
    for name, n in grid["curvature"].items():
        res = _call(b.run, name, n, **_repeats_or_rounds(b.run, grid))
        case = f"{'2-500-500-1 MLP' if name == 'mlp' else 'LeNet-5 CNN'} GGN @ V, n={n}"
        for (method, r), t in res["times"].items():
            # the gradient timed alongside the r-column products if recorded, else the best one
            t, t_grad = t if isinstance(t, tuple) else (t, res.get(("grad", r), res["grad"]))
            out.append({"study": "curvature", "case": f"{case}, r={r}", "method": method, "seconds": t,
                        "ratio": t / t_grad, "baseline": "product / one gradient"})
    return out


def _repeats_or_rounds(fn, grid: dict) -> dict:
    """bench_curvature.run takes ``repeats`` (older) or ``rounds`` = (r = 1 rounds, r = 16 rounds)."""
    if "rounds" in inspect.signature(fn).parameters:
        return {"rounds": (2, 1) if grid["quick"] else (15, 3)}
    return {"repeats": grid["repeats"]}


def _gp(b: ModuleType, grid: dict) -> list[dict]:
    big = b.mlp([5, 200, 2000, 200, 1], act=nn.ELU, dtype=torch.float32)
    cells = [(f"803,601-param ELU MLP, n={n}", big, n) for n in grid["gp_n"]]
    cells += [(f"depth-5 ELU width {w}, n=1000", b.mlp([5] + [w] * 5 + [1], act=nn.ELU), 1000)
              for w in grid["gp_widths"]]
    out = []
    for label, model, n in progress(cells, "gp timing"):
        row = b.study("speed", [(label, model, n)], 5, grid["cap"])[0]
        done = [row[s] for s in ("function", "weight") if row.get(s)]
        for space in b.SPACES:
            if row.get(space):
                out.append({"study": "gp", "case": f"{label} (p={row['p']:,})", "method": space,
                            "seconds": row[space], "ratio": row[space] / min(done) if done else math.nan,
                            "baseline": "time / faster space", "used": row.get(space + "_used")})
    return out


def _figure(records: list[dict], out: Path) -> Path:
    plt = pyplot()
    groups = []
    for study in ("products", "ntk", "curvature", "gp"):
        recs = [r for r in records if r["study"] == study and math.isfinite(r["ratio"])]
        if recs:
            groups.append((study, recs))
    sizes = [len(recs) for _, recs in groups] or [1]
    # one row per study, its height following its number of bars, so no label is squeezed
    fig, axes = plt.subplots(
        len(sizes), 1, figsize=(9, 1.0 + 0.24 * sum(sizes) + 0.5 * len(sizes)),
        gridspec_kw={"height_ratios": sizes}, squeeze=False,
    )
    for ax, (study, recs) in zip(axes[:, 0], groups):
        ax.barh(range(len(recs)), [r["ratio"] for r in recs], color="tab:blue")
        ax.set_yticks(range(len(recs)), [f"{r['case']}  ·  {r['method']}" for r in recs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(f"{study}: {recs[0]['baseline']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, "speed_ratios.png")


def run(cfg: RunConfig) -> dict:
    """Run the speed studies (``fntk run speed`` / ``fntk bench``); ``--quick`` is about a minute.

    ``cfg.extra`` may override grid entries and ``studies`` (a subset of products, ntk, curvature,
    gp) and ``threads`` (default ``$FNTK_THREADS`` or 1: the benchmarks share the machine's cores).
    """
    mods = load_benchmarks()
    grid = dict(QUICK if cfg.quick else FULL)
    grid.update({k: v for k, v in cfg.extra.items() if k in grid})
    studies = {"products": (_products, "bench_products"), "ntk": (_ntk, "bench_ntk"),
               "curvature": (_curvature, "bench_curvature"), "gp": (_gp, "bench_gp")}
    chosen = cfg.extra.get("studies", tuple(studies))
    start = time.perf_counter()
    records: list[dict] = []
    old = torch.get_num_threads()
    torch.set_num_threads(default_threads(cfg))
    try:
        for name in progress(chosen, "speed studies"):
            fn, mod = studies[name]
            records += fn(mods[mod], grid)
    finally:
        torch.set_num_threads(old)
    by = ("study", "case", "method")
    table = format_table(records_to_rows(records), by, METRICS)
    say(f"speed ({'quick' if cfg.quick else 'full'} grid; best of {grid['repeats']}; ratio as in the "
        "'baseline' column of results.json; ± is 0: one timing per cell)")
    say(table)
    figure = _figure(records, cfg.out)
    results = {
        "experiment": "speed",
        "config": {**grid, "curvature": dict(grid["curvature"]), "studies": list(chosen), "quick": cfg.quick},
        "methods": sorted({r["method"] for r in records}),
        "records": records,
        "table": table,
        "figures": [str(figure)],
    }
    return finish(cfg, results, start, str(figure))


def records_to_rows(records: list[dict]) -> list[dict]:
    """One table row per record (``seconds``, ``ratio`` with zero spread)."""
    return [{**r, "seconds_std": 0.0, "ratio_std": 0.0} for r in records]
