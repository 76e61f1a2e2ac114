"""Malaria incidence in Kenya, 2012 → 2016: adapt a heteroscedastic network to a later year.

As the paper's malaria experiment (amzn/xfer ``finite_ntk/experiments/malaria/run_ntk.py``), on the
Malaria Atlas Project's Kenya surface (:mod:`fntk.data.malaria`): inputs are (lon, lat) scaled to
[0, 1], the target is Pf incidence (cases per person per year). For every seed a 2-500-500-2 tanh
network with a heteroscedastic Gaussian likelihood (output 0 the mean, output 1 the raw variance)
is trained on 2,000 random pixels of 2012 (Adam, lr 1e-3, batches of 200, 200 epochs). It is then
adapted with nx random pixels of 2016 (nested in nx) and tested on 5,000 other 2016 pixels (the same
for all nx).

Units: every method sees incidence standardised by the 2012 source pixels' mean and std (training
the heteroscedastic net on the raw rates, ~0.03 ± 0.05, was unstable: its MSE rose above the
variance of the data); predictions are mapped back and all metrics are in cases per person-year.

Methods:

- ``source``: the 2012 network, its own heteroscedastic predictive.
- ``ntk_gp``: :class:`fntk.NTKRegressor` on output 0 (all 252,502 parameters) with its default
  model choice, told the net's variance output (``variance_output=1``, softplus link) so that the
  candidates include the source-noise models and the noise prior is centred on the net's own
  variance; ``ntk_gp_evidence``, ``ntk_gp_marglik``, ``ntk_gp_network`` (the plain f₀ + b model,
  the default before), ``oracle`` and ``cand:<model>``: see :mod:`fntk.experiments.model_choice`.
- ``ntk_gp_paper``: the paper code's fixed defaults: constant prior mean b = 0, kernel scale 1,
  noise 0.6932 (GPyTorch's ``GaussianLikelihood`` default: softplus(0) + 1e-4), nothing learned
  (in the standardised units the networks are trained in).
- ``finetune_last``: the last layer retrained on the 2016 pixels with the heteroscedastic NLL
  (Adam, full batch), its own predictive variance. Fixed budgets were brittle here (what helps at
  nx = 500 diverges at nx = 10), so the learning rate in {1e-3, 1e-2} and the number of steps in
  {100, 300} are chosen per fit by 3-fold cross-validation on the held-out NLL
  (:func:`fntk.baselines.finetune_cv`), then refit on all nx pixels.
- ``finetune_all``: all layers, the same loss and protocol with learning rates {1e-4, 1e-3}.
- ``rbf_gp``: an ARD RBF-kernel GP on the 2016 pixels only (:func:`fntk.baselines.rbf_gp`, five
  starts of the evidence search).

Metrics on the test pixels: MSE, Gaussian NLL (predictive variance including noise), 95% coverage.
Figures: maps of the 2016 truth, the source prediction, the NTK-GP mean and standard deviation
(nx = 100, first seed), and MSE versus nx.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fntk import baselines, metrics
from fntk.data.malaria import MalariaYear, malaria_transfer
from fntk.data.nets import heteroscedastic_mean_var, heteroscedastic_mlp, heteroscedastic_nll
from fntk.experiments import model_choice
from fntk.experiments.common import (
    RunConfig,
    default_threads,
    errorbars_by_method,
    experiment_grid,
    finish,
    format_table,
    progress,
    pyplot,
    save_figure,
    say,
    seeded,
    summarize,
    torch_threads,
    train_heteroscedastic_source,
)
from fntk.gp import NTKRegressor
from fntk.linearize import Linearized

METHODS = ("source", *model_choice.METHODS, "ntk_gp_paper", "finetune_last", "finetune_all", "rbf_gp")
VARIANCE_OUTPUT = 1  # the heteroscedastic net's raw variance: softplus link
FIGURE_METHODS = ("source", "ntk_gp", "ntk_gp_network", "ntk_gp_paper", "finetune_last", "finetune_all",
                  "rbf_gp")
METRICS = ("mse", "nll", "coverage", "seconds")
FULL = {"seeds": 5, "nx": (10, 25, 50, 100, 250, 500), "n_source": 2000, "n_test": 5000,
        "source_epochs": 200, "finetune_epochs": (100, 300), "map_nx": 100, "map_stride": 1}
QUICK = {"seeds": 1, "nx": (10, 50), "n_source": 2000, "n_test": 1000,
         "source_epochs": 10, "finetune_epochs": (30,), "map_nx": 50, "map_stride": 3}
SOURCE = {"lr": 1e-3, "batch_size": 200}
FINETUNE = {
    "finetune_last": {"params": "last", "lrs": (1e-3, 1e-2)},
    "finetune_all": {"params": "all", "lrs": (1e-4, 1e-3)},
}
CV_FOLDS = 3
#: GPyTorch's GaussianLikelihood starts at softplus(0) + 1e-4 (its GreaterThan(1e-4) constraint)
GPYTORCH_DEFAULT_NOISE = math.log(2.0) + 1e-4
PREDICT_CHUNK = 5000


def _source_net(cfg: RunConfig, data: dict, seed: int, epochs: int) -> nn.Module:
    """The heteroscedastic 2-500-500-2 tanh network trained on the 2012 pixels; cached."""
    net = seeded(seed, lambda: heteroscedastic_mlp((2, 500, 500), "tanh"))

    key = f"malaria_source_standardised_seed{seed}_n{data['x_source'].shape[0]}_epochs{epochs}"
    return train_heteroscedastic_source(
        cfg, net, data, key, epochs, SOURCE["lr"], SOURCE["batch_size"], seed, "malaria"
    )


def _net_predictive(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return heteroscedastic_mean_var(net(x))


def _ntk_gp(lin: Linearized, method: str) -> NTKRegressor:
    if method == "ntk_gp":
        return NTKRegressor(lin, output=0, variance_output=VARIANCE_OUTPUT)
    return NTKRegressor(lin, output=0, mean="constant", constant=0.0, scale=1.0,
                        noise=GPYTORCH_DEFAULT_NOISE, optimize=False)


def _predict_chunks(reg: NTKRegressor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, predictive variance, latent std) at x, in chunks of PREDICT_CHUNK points."""
    parts = [reg.predict(x[s : s + PREDICT_CHUNK]) for s in range(0, x.shape[0], PREDICT_CHUNK)]
    return (torch.cat([p.mean for p in parts]), torch.cat([p.predictive_variance for p in parts]),
            torch.cat([p.stddev for p in parts]))


def _predict(method: str, net: nn.Module, lin: Linearized, x: Tensor, y: Tensor, xt: Tensor,
             steps: tuple[int, ...], info: dict) -> tuple[Tensor, Tensor]:
    """(mean, predictive variance) of one method at the test inputs xt.

    ``steps``: the fine-tuning step counts cross-validated over; the chosen lr/steps go to ``info``.
    """
    if method == "source":
        return _net_predictive(net, xt)
    if method == "ntk_gp_paper":
        return _predict_chunks(_ntk_gp(lin, method).fit(x, y), xt)[:2]
    if method in FINETUNE:
        spec = FINETUNE[method]
        tuned, cv = baselines.finetune_cv(net, x, y, spec["params"], heteroscedastic_nll, lrs=spec["lrs"],
                                          epochs=steps, folds=CV_FOLDS)
        info.update(lr=cv["lr"], steps=cv["epochs"])
        return _net_predictive(tuned, xt)
    if method == "rbf_gp":
        pred = baselines.rbf_gp(x, y, xt, steps=100, optimizer="lbfgs")
        return pred.mean, pred.predictive_variance
    raise ValueError(f"unknown method {method!r}")


def _maps(target: MalariaYear, net: nn.Module, lin: Linearized, data: dict, units: tuple[float, float],
          nx: int, stride: int, out: Path) -> Path:
    """Maps of the 2016 truth, the source prediction, the NTK-GP mean and its std (nx pixels).

    ``units`` = (mean, std) of the standardisation; every ``stride``-th raster row/column is drawn.
    """
    plt = pyplot()
    mu, sd = units
    keep = (target.rows % stride == 0) & (target.cols % stride == 0)
    x = target.x[keep]
    src_mean = mu + sd * _net_predictive(net, x)[0]
    reg = _ntk_gp(lin, "ntk_gp").fit(data["x_target"][:nx], data["y_target"][:nx])
    mean, _, std = _predict_chunks(reg, x)
    mean, std = mu + sd * mean, sd * std

    def grid(values: Tensor):
        full = torch.full((target.x.shape[0],), float("nan"), dtype=torch.float64)
        full[keep] = values.detach().double()
        return target.to_grid(full)[::stride, ::stride]

    panels = [("2016 truth", target.y[keep]), ("2012 source network", src_mean),
              (f"NTK-GP mean (nx = {nx})", mean), ("NTK-GP std", std)]
    vmax = float(target.y.max())
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for ax, (title, values) in zip(axes, panels):
        is_std = title.startswith("NTK-GP std")
        cmap = "magma" if is_std else "viridis"
        im = ax.imshow(grid(values), extent=target.extent, origin="upper", cmap=cmap, vmin=0,
                       vmax=None if is_std else vmax)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        if title.startswith("NTK-GP mean"):
            pts = data["x_target"][:nx]
            lo = torch.tensor(target.extent[::2]), torch.tensor(target.extent[1::2])
            lonlat = lo[0] + pts.double() * (lo[1] - lo[0])
            ax.scatter(lonlat[:, 0], lonlat[:, 1], s=4, c="white", edgecolors="black", linewidths=0.3)
    fig.tight_layout()
    return save_figure(fig, out, "malaria_maps.png")


def _mse_figure(rows: list[dict], nxs: tuple[int, ...], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    errorbars_by_method(ax, rows, FIGURE_METHODS, "nx", "mse")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(nxs), [str(n) for n in nxs])
    ax.set_xlabel("labelled 2016 pixels (nx)")
    ax.set_ylabel("test MSE (5,000 pixels of 2016)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, "malaria_mse_vs_nx.png")


def _seed(cfg: RunConfig, grid: dict, nxs: tuple[int, ...], seed: int, records: list, figures: list) -> None:
    """One seed: train (or load) the source net, run every method for every nx, maps for cfg.seed."""
    data = malaria_transfer(max(nxs), seed, cfg.data, n_source=grid["n_source"], n_test=grid["n_test"])
    mu, sd = float(data["y_source"].mean()), float(data["y_source"].std())
    for key in ("y_source", "y_target"):
        data[key] = (data[key] - mu) / sd
    net = _source_net(cfg, data, seed, grid["source_epochs"])
    lin = Linearized(net)
    xt, yt = data["x_test"], data["y_test"]
    for nx in progress(nxs, f"malaria seed {seed}"):
        x, y = data["x_target"][:nx], data["y_target"][:nx]

        def score(mean: Tensor, var: Tensor) -> dict:
            return metrics.regression_metrics(mu + sd * mean, sd**2 * var, yt)

        gp_recs, _ = model_choice.ntk_gp_records(
            lin, x, y, xt, lambda reg, xs: _predict_chunks(reg, xs)[:2], score, {"nx": nx, "seed": seed},
            variance_output=VARIANCE_OUTPUT, kw={"output": 0})
        records += gp_recs
        for method in METHODS:
            if method in model_choice.METHODS:
                continue
            t0, info = time.perf_counter(), {}
            mean, var = _predict(method, net, lin, x, y, xt, tuple(grid["finetune_epochs"]), info)
            mean, var = mu + sd * mean, sd**2 * var
            rec = {"nx": nx, "seed": seed, "method": method, "seconds": time.perf_counter() - t0, **info}
            rec.update(metrics.regression_metrics(mean, var, yt))
            records.append(rec)
    if seed == cfg.seed:
        map_nx = min(grid["map_nx"], max(nxs))
        maps = _maps(data["target"], net, lin, data, (mu, sd), map_nx, grid["map_stride"], cfg.out)
        figures.append(str(maps))


def run(cfg: RunConfig) -> dict:
    """Run the malaria transfer experiment (data from ``cfg.data`` or ``$FNTK_DATA``).

    ``cfg.extra`` may override grid entries: ``seeds``, ``nx``, ``n_source``, ``n_test``,
    ``source_epochs``, ``finetune_epochs`` (the step counts cross-validated over), ``map_nx``,
    ``map_stride``.
    """
    grid, seeds = experiment_grid(cfg, QUICK, FULL)
    nxs = tuple(grid["nx"])
    start = time.perf_counter()
    records: list[dict] = []
    figures: list[str] = []
    with torch_threads(default_threads(cfg)):
        for seed in seeds:
            _seed(cfg, grid, nxs, seed, records, figures)
    rows = summarize(model_choice.main_records(records), ("nx", "method"), METRICS)
    rows.sort(key=lambda r: (r["nx"], METHODS.index(r["method"])))
    table = format_table(rows, ("nx", "method"), METRICS)
    choice_rows, choice = model_choice.choice_table(records, ("nx",), ("mse", "nll"))
    figures.append(str(_mse_figure(rows, nxs, cfg.out)))
    say(f"malaria 2012 → 2016 (Kenya): {len(seeds)} seeds, test on {grid['n_test']} pixels of 2016 "
        "(mean ± std over seeds; seconds per fit+predict)")
    say(table)
    say("model choice: every candidate (mean ± std over seeds), how often each criterion chose it")
    say(choice)
    results = {
        "experiment": "malaria",
        "units": "incidence, cases per person-year (methods work on 2012-standardised values)",
        "config": {**grid, "nx": list(nxs), "seed": cfg.seed, "quick": cfg.quick, "source": SOURCE,
                   "finetune": FINETUNE, "cv_folds": CV_FOLDS,
                   "gpytorch_default_noise": GPYTORCH_DEFAULT_NOISE},
        "methods": list(METHODS),
        "summary": rows,
        "table": table,
        "choice_summary": choice_rows,
        "choice_table": choice,
        "records": records,
        "figures": figures,
    }
    return finish(cfg, results, start, f"{len(figures)} figures")
