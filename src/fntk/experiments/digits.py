"""Digit transfer: adapt the pretrained MNIST LeNet5 to USPS and to scikit-learn's digits.

Source: the clean-trained MNIST LeNet5 (:func:`fntk.data.nets.load_pretrained_lenet5`, 648,226
parameters) read from ``pretrained_mnist_lenet5`` under the data root. Targets
(:func:`fntk.data.digits.digits_transfer`, images resized and padded to MNIST's 28x28 format):
USPS (m labelled images from USPS train, tested on USPS test) and ``load_digits`` (m labelled,
tested on the rest). m class-balanced labelled images, ``n_test`` random held-out test images,
several seeds (each seed draws both the labelled set and the test subset).

Methods (k = 10 logits, n = m labelled points):

- ``source``: the MNIST network as is.
- ``logreg_last``: multinomial logistic regression on the penultimate (200-d) features, weight
  decay chosen by 5-fold CV on the m labels (:func:`fntk.baselines.last_layer_logreg`).
- ``finetune_all``: all layers fine-tuned (Adam, full batch, cross-entropy), learning rate and
  number of epochs chosen by 3-fold CV on the m labels (:func:`fntk.baselines.finetune_cv`).
- ``laplace_{last,all}``: :class:`fntk.LinearizedClassifier` (inference="laplace") on the last
  layer (2,010 parameters) or all parameters; prior N(θ̂, λ⁻¹I) with λ maximising the Laplace
  evidence; probit predictive. Function space when n·k ≤ p, else weight space.
- ``map_{last,all}``: the MAP of the same fit, plug-in softmax predictive (identical to
  ``inference="map"`` with the evidence-chosen λ, without fitting twice).
- ``vi_{last,all}``: ``inference="vi"`` at the Laplace fit's λ (rank-128 subspace, Monte Carlo
  predictive). Kernels are shared between the Laplace and VI fits (:func:`fntk.ntk.cached_kernels`).
- ``{map,laplace}_cv_{last,all}``, ``vi_cv_last``: ``prior_precision="cv"``: λ by 3-fold
  cross-validation of the held-out NLL of the same inference's predictive over ``CV["grid"]``,
  then a refit on all labels
  (:mod:`fntk.classify.cv`); only where every class has at least 3 labels (m = 10 has one label per
  class) and m ≤ ``CV["max_m"]``; VI on the first ``CV["vi_seeds"]`` seeds and a coarser grid (one
  VI fit per fold and λ). The CV fits run in function space (n·k ≤ p there), whose folds read
  their kernels from the pool: the same MAP, Laplace and VI as any space, several times faster
  here than the last-layer backend ``space="auto"`` picks for the last layer.

Metrics on the test images: accuracy, NLL, ECE (15 bins), Brier; mean ± std over seeds. Seconds:
fit + predict per method (``map`` shares the Laplace fit; ``vi`` excludes the λ search). The test
set is drawn once per (target, seed) and shared by every m (for ``load_digits``: held out from the
largest labelled set; the labelled sets are nested in m), so the NTK of [largest labelled set;
test set] is computed once per (target, seed) (:func:`fntk.ntk.kernel_pool`, its time in
``kernel_pool_seconds``, not in the per-method seconds).
Figure: accuracy and NLL against m for both targets.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fntk import baselines, metrics
from fntk.classify import LinearizedClassifier
from fntk.data.digits import digits_transfer
from fntk.data.nets import load_pretrained_lenet5
from fntk.experiments.common import (
    RunConfig,
    format_table,
    progress,
    pyplot,
    save_figure,
    say,
    summarize,
    write_results,
)
from fntk.linearize import Linearized
from fntk.ntk import cached_kernels, kernel_pool

ALL_METHODS = (
    "source",
    "logreg_last",
    "finetune_all",
    "map_last",
    "laplace_last",
    "vi_last",
    "map_cv_last",
    "laplace_cv_last",
    "vi_cv_last",
    "map_all",
    "laplace_all",
    "vi_all",
    "map_cv_all",
    "laplace_cv_all",
)
METRICS = ("accuracy", "nll", "ece", "brier", "seconds")
FULL = {
    "seeds": 5,
    "ms": (10, 50, 100, 500),
    "targets": ("usps", "sklearn"),
    "n_test": 500,
    "methods": ALL_METHODS,
    "all_params_max_m": 500,  # all-parameter linearized methods only for m up to this
    "seeds_per_m": {},  # {m: k}: only the first k seeds at that m (to cut CPU time)
}
QUICK = {
    "seeds": 1,
    "ms": (10, 30),  # m = 30: three labels per class, the fewest 3-fold CV takes
    "targets": ("usps", "sklearn"),
    "n_test": 100,
    "methods": ("source", "logreg_last", "laplace_last", "map_cv_last", "map_all", "laplace_all"),
    "all_params_max_m": 10,
    "seeds_per_m": {},
}
FINETUNE = {"lrs": (1e-4, 1e-3), "epochs": (5, 15, 30), "folds": 3}
#: prior_precision="cv": folds, λ grid (10^-1 … 10^4 in half decades; VI: decades), the largest m of
#: the CV fits, the seeds of the VI CV fits
CV = {"folds": 3, "grid": tuple(10.0 ** (e / 2) for e in range(-2, 9)),
      "vi_grid": tuple(10.0**e for e in range(-1, 5)), "max_m": 100, "vi_seeds": 2}
VI = {"vi_rank": 64, "vi_samples": 32, "num_samples": 200}


def _probs(net: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(net.eval()(x), -1)


def _scores(probs: Tensor, y: Tensor) -> dict[str, float]:
    return metrics.classification_metrics(probs, y)


def _linearized(
    lin: Linearized, x: Tensor, y: Tensor, xt: Tensor, suffix: str, wanted: set[str], seed: int
) -> dict[str, tuple[Tensor, float, dict]]:
    """map/laplace/vi on one parameter set: {method: (probs, seconds, info)}."""
    out: dict[str, tuple[Tensor, float, dict]] = {}
    names = {f"{m}_{suffix}" for m in ("map", "laplace", "vi")} & wanted
    if not names:
        out.update(_cross_validated(lin, x, y, xt, suffix, wanted, seed))
        return {k: v for k, v in out.items() if k in wanted}
    with cached_kernels():
        t0 = time.perf_counter()
        lap = LinearizedClassifier(lin, inference="laplace", seed=seed).fit(x, y)
        mean, cov = lap.predict_f(xt)
        info = {
            "lambda": lap.prior_precision_,
            "space": lap.space_,
            "converged": lap.converged_,
            "grad_norm": lap.grad_norm_,
            "marglik_steps": len(lap.marglik_history_),
        }
        t_map = time.perf_counter() - t0
        probs_lap = lap.predict_proba(xt)  # the test kernels are cached: only the link is new
        t_lap = time.perf_counter() - t0
        out[f"map_{suffix}"] = (torch.softmax(mean.double(), -1), t_map, info)
        out[f"laplace_{suffix}"] = (probs_lap, t_lap, info)
        if f"vi_{suffix}" in wanted:
            t1 = time.perf_counter()
            vi = LinearizedClassifier(
                lin, inference="vi", prior_precision=lap.prior_precision_, seed=seed, **VI
            ).fit(x, y)
            probs_vi = vi.predict_proba(xt)
            vinfo = {**info, "elbo": vi.elbo_, "vi_rank": vi.vi_rank_, "vi_converged": vi.vi_converged_}
            out[f"vi_{suffix}"] = (probs_vi, time.perf_counter() - t1, vinfo)
        del cov
    out.update(_cross_validated(lin, x, y, xt, suffix, wanted, seed))
    return {k: v for k, v in out.items() if k in wanted}


def _cross_validated(
    lin: Linearized, x: Tensor, y: Tensor, xt: Tensor, suffix: str, wanted: set[str], seed: int
) -> dict[str, tuple[Tensor, float, dict]]:
    """{map,laplace,vi}_cv on one parameter set (those ``wanted`` and allowed by the labels)."""
    out: dict[str, tuple[Tensor, float, dict]] = {}
    if int(torch.bincount(y).min()) < CV["folds"]:  # m = 10: one label per class
        return out
    for inference in ("map", "laplace", "vi"):
        name = f"{inference}_cv_{suffix}"
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        kw = dict(VI) if inference == "vi" else {}
        grid = CV["vi_grid"] if inference == "vi" else CV["grid"]
        with cached_kernels():
            clf = LinearizedClassifier(lin, inference=inference, prior_precision="cv", cv_folds=CV["folds"],
                                       cv_grid=grid, seed=seed, space="function", **kw).fit(x, y)
            probs = clf.predict_proba(xt)
        info = {"lambda": clf.prior_precision_, "space": clf.space_, "converged": clf.converged_,
                "cv_history": [list(item) for item in clf.cv_history_]}
        out[name] = (probs, time.perf_counter() - t0, info)
    return out


def _evaluate(
    net: nn.Module,
    lins: dict[str, Linearized],
    data: dict[str, Tensor],
    methods: tuple[str, ...],
    seed: int,
    all_params: bool,
    seed_index: int = 0,
) -> dict[str, tuple[Tensor, float, dict]]:
    x, y, xt = data["x_train"], data["y_train"], data["x_test"]
    wanted = set(methods)
    res: dict[str, tuple[Tensor, float, dict]] = {}
    if "source" in wanted:
        t0 = time.perf_counter()
        res["source"] = (_probs(net, xt), time.perf_counter() - t0, {})
    if "logreg_last" in wanted:
        t0 = time.perf_counter()
        fit = baselines.last_layer_logreg(
            baselines.penultimate_features(net, x), y, num_classes=10, seed=seed
        )
        probs = fit.predict_proba(baselines.penultimate_features(net, xt))
        res["logreg_last"] = (probs, time.perf_counter() - t0, {"weight_decay": fit.weight_decay})
    if "finetune_all" in wanted:
        t0 = time.perf_counter()
        tuned, info = baselines.finetune_cv(
            net, x, y, "all", "ce", FINETUNE["lrs"], FINETUNE["epochs"], folds=FINETUNE["folds"], seed=seed
        )
        res["finetune_all"] = (
            _probs(tuned, xt),
            time.perf_counter() - t0,
            {"lr": info["lr"], "epochs": info["epochs"]},
        )
    cv_ok = {f"{i}_cv_{s}" for i in ("map", "laplace", "vi") for s in ("last", "all")}
    if x.shape[0] > CV["max_m"]:
        cv_ok = set()
    if seed_index >= CV["vi_seeds"]:
        cv_ok -= {"vi_cv_last", "vi_cv_all"}
    wanted = (wanted - {n for n in wanted if "_cv_" in n}) | (wanted & cv_ok)
    res.update(_linearized(lins["last"], x, y, xt, "last", wanted, seed))
    if all_params:
        res.update(_linearized(lins["all"], x, y, xt, "all", wanted, seed))
    return res


def _figure(rows: list[dict], targets: tuple[str, ...], ms: tuple[int, ...], out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(len(targets), 2, figsize=(10, 3.6 * len(targets)), squeeze=False)
    styles = {
        "source": ("k", ":"),
        "logreg_last": ("tab:gray", "--"),
        "finetune_all": ("tab:brown", "--"),
        "map_last": ("tab:blue", ":"),
        "map_cv_last": ("tab:green", ":"),
        "laplace_cv_last": ("tab:green", "-"),
        "vi_cv_last": ("tab:olive", "-"),
        "map_cv_all": ("tab:purple", ":"),
        "laplace_cv_all": ("tab:purple", "-"),
        "laplace_last": ("tab:blue", "-"),
        "vi_last": ("tab:cyan", "-"),
        "map_all": ("tab:red", ":"),
        "laplace_all": ("tab:red", "-"),
        "vi_all": ("tab:orange", "-"),
    }
    for i, target in enumerate(targets):
        for j, metric in enumerate(("accuracy", "nll")):
            ax = axes[i][j]
            for method in ALL_METHODS:
                r = sorted(
                    (row for row in rows if row["method"] == method and row["target"] == target),
                    key=lambda row: row["m"],
                )
                if not r:
                    continue
                color, ls = styles[method]
                ax.errorbar(
                    [row["m"] for row in r],
                    [row[metric] for row in r],
                    yerr=[row[metric + "_std"] for row in r],
                    color=color,
                    ls=ls,
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=method,
                )
            ax.set_xscale("log")
            ax.set_xticks(list(ms))
            ax.set_xticklabels([str(m) for m in ms])
            ax.set_xlabel("labelled target images m")
            ax.set_ylabel("test " + ("accuracy" if metric == "accuracy" else "NLL"))
            ax.set_title(f"MNIST LeNet5 → {'USPS' if target == 'usps' else 'sklearn digits'}")
            if metric == "nll":
                ax.set_yscale("log")
    axes[0][1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, out, "digits_transfer.png")


def run(cfg: RunConfig) -> dict:
    """Run the digit-transfer experiment (source weights and USPS from ``cfg.data`` or ``$FNTK_DATA``).

    ``cfg.extra`` may override ``seeds``, ``ms``, ``targets``, ``n_test``, ``methods``,
    ``all_params_max_m`` and ``seeds_per_m``.
    """
    grid = dict(QUICK if cfg.quick else FULL)
    grid.update({k: v for k, v in cfg.extra.items() if k in grid})
    ms, targets, methods = tuple(grid["ms"]), tuple(grid["targets"]), tuple(grid["methods"])
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown digits methods {sorted(unknown)}; choose from {list(ALL_METHODS)}")
    seeds = [cfg.seed + i for i in range(grid["seeds"])]
    start = time.perf_counter()
    net = load_pretrained_lenet5(cfg.data)
    lins = {"last": Linearized(net, baselines.last_layer_names(net)), "all": Linearized(net)}
    records: list[dict] = []
    kernel_seconds: list[dict] = []
    for target, seed in progress([(t, s) for t in targets for s in seeds], "digits"):
        here = [m for m in ms if seed - cfg.seed < grid["seeds_per_m"].get(m, len(seeds))]
        small = [m for m in here if m <= grid["all_params_max_m"]]
        # one test set per (target, seed), shared by every m; the labelled sets are nested in m, so
        # one kernel pool of [largest labelled set; test set] serves every fit (kernel_pool)
        big = digits_transfer(target, max(ms), seed, root=cfg.data, n_test=grid["n_test"])
        xt, yt = big["x_test"], big["y_test"]
        with contextlib.ExitStack() as pools:
            t0 = time.perf_counter()
            for kind, mmax in (("last", max(here)), ("all", max(small, default=0))):
                if mmax and any(mt.endswith("_" + kind) for mt in methods if mt != "logreg_last"):
                    xl = digits_transfer(target, mmax, seed, root=cfg.data, n_test=1)["x_train"]
                    pools.enter_context(kernel_pool(lins[kind], torch.cat([xl, xt])))
            kernel_seconds.append({"target": target, "seed": seed, "seconds": time.perf_counter() - t0})
            for m in progress(here, f"{target} seed {seed}"):
                d = digits_transfer(target, m, seed, root=cfg.data, n_test=1)
                data = {"x_train": d["x_train"], "y_train": d["y_train"], "x_test": xt}
                small_m = m <= grid["all_params_max_m"]
                res = _evaluate(net, lins, data, methods, seed, small_m, seed - cfg.seed)
                for method, (probs, seconds, info) in res.items():
                    rec = {
                        "target": target,
                        "m": m,
                        "seed": seed,
                        "method": method,
                        "seconds": seconds,
                        "n_test": int(yt.numel()),
                        **_scores(probs, yt),
                        **info,
                    }
                    records.append(rec)
    by = ("target", "m", "method")
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    rows = summarize(records, by, METRICS)
    rows.sort(key=lambda r: (targets.index(r["target"]), r["m"], order[r["method"]]))
    figure = _figure(rows, targets, ms, cfg.out)
    table = format_table(rows, by, ("accuracy", "nll", "ece"), digits=3)
    fewer = ", ".join(f"m={m}: {k}" for m, k in grid["seeds_per_m"].items() if m in ms)
    say(
        f"digit transfer from MNIST LeNet5: {len(seeds)} seed(s)"
        + (f" ({fewer})" if fewer else "")
        + f", {grid['n_test']} test images per target (mean ± std over seeds)"
    )
    say(table)
    results = {
        "experiment": "digits",
        "config": {
            **grid,
            "seeds_per_m": {str(k): v for k, v in grid["seeds_per_m"].items()},
            "ms": list(ms),
            "targets": list(targets),
            "methods": list(methods),
            "seed": cfg.seed,
            "quick": cfg.quick,
            "finetune": FINETUNE,
            "vi": VI,
            "cv": CV,
        },
        "methods": sorted({r["method"] for r in records}, key=order.get),
        "summary": rows,
        "table": table,
        "records": records,
        "kernel_pool_seconds": kernel_seconds,
        "figures": [str(figure)],
        "wall_seconds": time.perf_counter() - start,
    }
    write_results(cfg.out, results)
    say(f"wrote {Path(cfg.out) / 'results.json'} and {figure}")
    return results
