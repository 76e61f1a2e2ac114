"""Rotated faces: regress the rotation angle of faces of people the network has never seen.

The paper's Olivetti experiment (amzn/xfer ``finite_ntk/experiments/olivetti``) rebuilt from the
ORL faces (:mod:`fntk.data.faces`): every face rotated by 30 random angles in [-90°, 90°] and
centre-cropped to 45x45; the target is the angle standardised by the source set's mean and std.
Source: 20 people (6,000 images); target: the other 20, of which a proportion p of the images is
labelled and the rest is the test set. The source network is the paper's LeNet-style CNN with a
heteroscedastic head (:class:`fntk.data.nets.FacesCNN`, 1.63 M parameters), trained on the source
people with the heteroscedastic Gaussian NLL (Adam, lr 1e-3, batches of 64).

Methods:

- ``source``: the source network, its own heteroscedastic predictive.
- ``ntk_gp``: :class:`fntk.NTKRegressor` on output 0 (all parameters) with its default model
  choice, told the net's variance output (``variance_output=1``); composite candidates (input
  kernel, source noise) only up to 2,000 labelled images, i.e. not at p = 0.5. ``ntk_gp_evidence``,
  ``ntk_gp_network`` (the plain f₀ + b model, the default before), ``oracle`` and ``cand:<model>``:
  see :mod:`fntk.experiments.model_choice` (``ntk_gp_marglik`` is not run here: it repeats every
  composite search without hyperpriors). The kernel is computed from a float64 copy of the network:
  the learned noise can be tiny (the kernel nearly interpolates), below the round-off of a float32
  kernel, whose Cholesky factorisation then fails.
- ``finetune_last``: the last layer retrained on the labelled target images (heteroscedastic NLL,
  Adam, lr 1e-3, batches of 32, 10 epochs; the paper's code used 15).
- ``finetune_all``: all layers, the same loss and budget with lr 1e-4.

Metrics on the unlabelled target images: RMSE in degrees, Gaussian NLL of the angle in degrees
(predictive variance including noise), 95% coverage. Figure: RMSE versus p.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fntk import baselines, metrics
from fntk.data.faces import faces_transfer, rotated_faces
from fntk.data.nets import FacesCNN, heteroscedastic_mean_var, heteroscedastic_nll
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

GP_METHODS = tuple(m for m in model_choice.METHODS if m != "ntk_gp_marglik")
METHODS = ("source", *GP_METHODS, "finetune_last", "finetune_all")
FIGURE_METHODS = ("source", "ntk_gp", "ntk_gp_network", "finetune_last", "finetune_all")
VARIANCE_OUTPUT = 1
METRICS = ("rmse_deg", "nll", "coverage", "seconds")
FULL = {"seeds": 5, "proportions": (0.1, 0.25, 0.5), "rotations": 30, "source_epochs": 10,
        "finetune_epochs": 10}
QUICK = {"seeds": 1, "proportions": (0.1,), "rotations": 3, "source_epochs": 2, "finetune_epochs": 2}
SOURCE = {"lr": 1e-3, "batch_size": 64}
FINETUNE = {
    "finetune_last": {"params": "last", "lr": 1e-3, "batch_size": 32},
    "finetune_all": {"params": "all", "lr": 1e-4, "batch_size": 32},
}
PREDICT_CHUNK = 2000


def _source_net(cfg: RunConfig, data: dict, seed: int, rotations: int, epochs: int) -> nn.Module:
    """The heteroscedastic FacesCNN trained on the source people; cached."""
    net = seeded(seed, lambda: FacesCNN(outputs=2))

    key = f"faces_source_seed{seed}_rot{rotations}_epochs{epochs}"
    return train_heteroscedastic_source(
        cfg, net, data, key, epochs, SOURCE["lr"], SOURCE["batch_size"], seed, "faces"
    )


def _net_predictive(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        chunks = range(0, x.shape[0], PREDICT_CHUNK)
        parts = [heteroscedastic_mean_var(net(x[s : s + PREDICT_CHUNK])) for s in chunks]
    return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])


def _predict(method: str, net: nn.Module, lin: Linearized, x: Tensor, y: Tensor, xt: Tensor, seed: int,
             epochs: int) -> tuple[Tensor, Tensor]:
    """(mean, predictive variance) of one method at xt, in standardised-angle units."""
    if method == "source":
        return _net_predictive(net, xt)
    if method in FINETUNE:
        spec = FINETUNE[method]
        tuned = baselines.finetune(net, x, y, spec["params"], heteroscedastic_nll, epochs, spec["lr"],
                                   seed=seed, batch_size=spec["batch_size"])
        return _net_predictive(tuned, xt)
    raise ValueError(f"unknown method {method!r}")


def _gp_predict(reg: NTKRegressor, chunks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(mean, predictive variance) over fixed chunk tensors (the same objects for every fit of a
    task, so that the cached cross kernels are found)."""
    parts = [reg.predict(c) for c in chunks]
    return torch.cat([p.mean for p in parts]), torch.cat([p.predictive_variance for p in parts])


def _scores(mean: Tensor, var: Tensor, y: Tensor, scale: float) -> dict[str, float]:
    """RMSE in degrees and the NLL/coverage of the angle in degrees (standardised → degrees)."""
    m = metrics.regression_metrics(mean, var, y)
    return {"rmse_deg": m["rmse"] * scale, "nll": m["nll"] + math.log(scale), "coverage": m["coverage"]}


def _figure(rows: list[dict], proportions: tuple[float, ...], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    errorbars_by_method(ax, rows, FIGURE_METHODS, "p", "rmse_deg")
    ax.set_xticks(list(proportions))
    ax.set_xlabel("proportion p of target images labelled")
    ax.set_ylabel("test RMSE (degrees)")
    ax.set_title("Rotated faces: unseen people")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, "faces_rmse_vs_p.png")


def _seed(cfg: RunConfig, grid: dict, proportions: tuple[float, ...], seed: int, records: list) -> None:
    """One seed: rotate the faces, train (or load) the source net, run every method for every p."""
    faces = rotated_faces(cfg.data, n_rotations=grid["rotations"], seed=seed)
    net = lin = None
    for p in progress(proportions, f"faces seed {seed}"):
        data = faces_transfer(p, seed, faces=faces)
        if net is None:  # the source people depend on the seed only
            net = _source_net(cfg, data, seed, grid["rotations"], grid["source_epochs"])
            # the GP's kernel in float64: with 1.63 M parameters the learned noise falls below the
            # float32 kernel's round-off (its smallest eigenvalues come out negative, ~1e-5)
            lin = Linearized(copy.deepcopy(net).double())
        x, y, xt, yt = data["x_target"], data["y_target"], data["x_test"], data["y_test"]
        base = {"p": p, "seed": seed, "n_labelled": x.shape[0], "n_test": xt.shape[0]}
        # float64 inputs for the float64 linearization, made once: the kernel caches key on identity
        x64 = x.double()
        chunks = [xt[s : s + PREDICT_CHUNK].double() for s in range(0, xt.shape[0], PREDICT_CHUNK)]

        def score(mean: Tensor, var: Tensor, yt: Tensor = yt, a: float = data["angle_std"]) -> dict:
            return _scores(mean, var, yt, a)

        gp_recs, _ = model_choice.ntk_gp_records(lin, x64, y, chunks, _gp_predict, score, base, marglik=False,
                                                 variance_output=VARIANCE_OUTPUT, kw={"output": 0})
        records += gp_recs
        for method in METHODS:
            if method in GP_METHODS:
                continue
            t0 = time.perf_counter()
            mean, var = _predict(method, net, lin, x, y, xt, seed, grid["finetune_epochs"])
            rec = {"p": p, "seed": seed, "method": method, "n_labelled": x.shape[0],
                   "n_test": xt.shape[0], "seconds": time.perf_counter() - t0}
            rec.update(_scores(mean, var, yt, data["angle_std"]))
            records.append(rec)


def run(cfg: RunConfig) -> dict:
    """Run the rotated-faces transfer experiment (data from ``cfg.data`` or ``$FNTK_DATA``).

    ``cfg.extra`` may override ``seeds``, ``proportions``, ``rotations``, ``source_epochs`` and
    ``finetune_epochs``.
    """
    grid, seeds = experiment_grid(cfg, QUICK, FULL)
    proportions = tuple(grid["proportions"])
    start = time.perf_counter()
    records: list[dict] = []
    with torch_threads(default_threads(cfg)):
        for seed in seeds:
            _seed(cfg, grid, proportions, seed, records)
    rows = summarize(model_choice.main_records(records), ("p", "method"), METRICS)
    rows.sort(key=lambda r: (r["p"], METHODS.index(r["method"])))
    table = format_table(rows, ("p", "method"), METRICS)
    choice_rows, choice = model_choice.choice_table(records, ("p",), ("rmse_deg", "nll"))
    figure = _figure(rows, proportions, cfg.out)
    say(f"rotated faces, unseen people: {len(seeds)} seeds, {grid['rotations']} rotations per face "
        "(mean ± std over seeds; seconds per fit+predict)")
    say(table)
    say("model choice: every candidate (mean ± std over seeds), how often each criterion chose it")
    say(choice)
    results = {
        "experiment": "faces",
        "config": {**grid, "proportions": list(proportions), "seed": cfg.seed, "quick": cfg.quick,
                   "source": SOURCE, "finetune": FINETUNE},
        "methods": list(METHODS),
        "summary": rows,
        "table": table,
        "choice_summary": choice_rows,
        "choice_table": choice,
        "records": records,
        "figures": [str(figure)],
    }
    return finish(cfg, results, start, str(figure))
