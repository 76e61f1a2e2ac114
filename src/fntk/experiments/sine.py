"""The paper's toy transfer: adapt a 1-40-40-1 tanh network trained on one task to new sine waves.

Two settings (:mod:`fntk.data.sine`): ``sine`` (the source task is itself a sine wave) and
``linear`` (the source task is a linear function; targets are sine waves). For every seed a source
network is trained on one source task of 100 points; each of T target tasks then gives ``nx``
labelled points (default 10) and is scored on a dense noiseless grid of 200 points on [-5, 5].

Methods (all see exactly the same data):

- ``source``: the source network unchanged.
- ``ntk_gp``: :class:`fntk.NTKRegressor` on the source network (all 1,761 parameters) with its
  default model choice (the candidate set of :func:`fntk.gp.default_candidates`, hyperpriors, the
  best leave-one-out predictive); ``ntk_gp_evidence``, ``ntk_gp_marglik``, ``oracle`` and the
  ``cand:<model>`` records: the other criteria and every candidate on the same fits
  (:mod:`fntk.experiments.model_choice`).
- ``ntk_gp_network``: the plain NTK-GP with prior mean f(x; θ̂) + b, scale, noise and b by the
  marginal likelihood (the library default before the model choice).
- ``ntk_gp_constant``: the same with a constant prior mean as in the paper's code, in function
  space (the n × n kernel).
- ``ntk_gp_weight``: that GP computed in weight space (p × p, push-through identity) at the
  hyperparameters learned in function space: a check that both spaces give the same posterior
  (their log marginal likelihoods are recorded per task). Learning the hyperparameters in weight
  space needs an eigendecomposition of the 1,761 × 1,761 JᵀJ per task (≈2.5 s each here, which
  would triple the run); with n = 10 ≪ p, ``space="auto"`` rightly picks function space.
- ``finetune_all``: Adam on all layers, full batch, lr 1e-2, 200 steps.
- ``finetune_last``: Adam on the last layer only, full batch, lr 3e-2, 200 steps.
- ``ablr``: :class:`fntk.baselines.ABLR`, a 1-40-40-50 tanh feature net trained by marginal
  likelihood on the same single source task (1,000 Adam steps), then Bayesian linear regression
  with the target's own (α, β) on the frozen features.
- ``rbf_gp``: an ARD RBF-kernel GP on the target points only (:func:`fntk.baselines.rbf_gp`: five
  starts of the evidence search, the best kept).

Point predictors (source, fine-tuning) get a homoscedastic Gaussian whose variance is their mean
squared residual on the data they were last trained on (floored at 1e-4), so NLL and coverage can be
compared. Metrics: MSE, Gaussian NLL of the noiseless truth under the predictive (latent + noise)
variance, and 95% interval coverage, averaged over tasks × seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fntk import baselines, metrics
from fntk.data import sine as sine_data
from fntk.data.nets import mlp
from fntk.experiments import model_choice
from fntk.experiments.common import (
    RunConfig,
    cached,
    cached_state,
    default_threads,
    experiment_grid,
    finish,
    format_table,
    progress,
    pyplot,
    residual_variance,
    save_figure,
    say,
    seeded,
    summarize,
    torch_threads,
)
from fntk.gp import NTKRegressor
from fntk.linearize import Linearized

SETTINGS = ("sine", "linear")
METHODS = (
    "source",
    *model_choice.METHODS,
    "ntk_gp_constant",
    "ntk_gp_weight",
    "finetune_all",
    "finetune_last",
    "ablr",
    "rbf_gp",
)
METRICS = ("mse", "nll", "coverage", "seconds")
DTYPE = torch.float64

FULL = {"seeds": 3, "tasks": 20, "nx": 10, "n_source": 100, "source_steps": 2000, "ablr_steps": 1000}
QUICK = {"seeds": 1, "tasks": 3, "nx": 10, "n_source": 100, "source_steps": 1000, "ablr_steps": 500}
FINETUNE = {
    "finetune_all": {"params": "all", "lr": 1e-2, "epochs": 200},
    "finetune_last": {"params": "last", "lr": 3e-2, "epochs": 200},
}
#: method → space of the constant-mean NTKRegressor (the paper's model)
NTK_GP = {"ntk_gp_constant": "function", "ntk_gp_weight": "weight"}
SOURCE_LR = 1e-2
ABLR_TARGET_STEPS = 100  # Adam steps (lr 0.1) on the target task's own log α, log β
FIGURE_TASKS = 4


def _source_net(
    cfg: RunConfig, task: sine_data.RegressionTask, kind: str, seed: int, steps: int
) -> nn.Module:
    """The 1-40-40-1 tanh source network trained (Adam, full batch) on the source task; cached."""
    net = seeded(seed, lambda: mlp((1, 40, 40, 1), "tanh").to(DTYPE))

    def train() -> nn.Module:
        return baselines.finetune(net, task.x_train, task.y_train, "all", "mse", steps, SOURCE_LR, seed=seed)

    key = f"sine_source_{kind}_seed{seed}_n{task.x_train.shape[0]}_steps{steps}"
    return cached_state(cfg.cache, key, train, net).eval()


def _ablr(cfg: RunConfig, task: sine_data.RegressionTask, kind: str, seed: int, steps: int) -> baselines.ABLR:
    """ABLR's feature net trained on the source task by marginal likelihood; cached."""
    ablr = baselines.ABLR(seed=seed, dtype=DTYPE)
    path = Path(cfg.cache) / f"sine_ablr_{kind}_seed{seed}_n{task.x_train.shape[0]}_steps{steps}.pt"

    def read(state: dict) -> baselines.ABLR:
        ablr.net.load_state_dict(state["net"])
        ablr.log_hypers_ = state["log_hypers"]
        return ablr

    def build() -> baselines.ABLR:
        return ablr.fit([(task.x_train, task.y_train)], steps=steps)

    return cached(path, read, build, lambda a: {"net": a.net.state_dict(), "log_hypers": a.log_hypers_})


def _predict(
    method: str,
    task: sine_data.RegressionTask,
    net: nn.Module,
    lin: Linearized,
    ablr: baselines.ABLR,
    source_var: float,
    shared: dict,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(mean, predictive variance, latent std or None) of one method on the task's test grid.

    ``shared`` carries the function-space GP's hyperparameters to the weight-space GP (same task)
    and receives the GP's log marginal likelihood (``"lml"``).
    """
    x, y, xt = task.x_train, task.y_train, task.x_test
    if method == "source":
        with torch.no_grad():
            mean = net(xt)[:, 0]
        return mean, torch.full_like(mean, source_var), None
    if method in NTK_GP:
        space = NTK_GP[method]
        if method == "ntk_gp_weight":  # at the function-space fit's hyperparameters
            reg = NTKRegressor(lin, space=space, mean="constant", optimize=False, **shared["hyper"])
        else:
            reg = NTKRegressor(lin, space=space, mean="constant")
        post = reg.fit(x, y).predict(xt)
        shared["lml"] = float(reg.log_marginal_likelihood())
        if method == "ntk_gp_constant":
            shared["hyper"] = {"scale": reg.scale_, "noise": reg.noise_, "constant": reg.constant_}
        return post.mean, post.predictive_variance, post.stddev
    if method in FINETUNE:
        spec = FINETUNE[method]
        tuned = baselines.finetune(net, x, y, spec["params"], "mse", spec["epochs"], spec["lr"])
        with torch.no_grad():
            mean, fit = tuned(xt)[:, 0], tuned(x)[:, 0]
        return mean, torch.full_like(mean, residual_variance(fit, y)), None
    if method == "ablr":
        pred = ablr.predict(x, y, xt, steps=ABLR_TARGET_STEPS, lr=0.1)
        return pred.mean, pred.predictive_variance, None
    if method == "rbf_gp":
        pred = baselines.rbf_gp(x, y, xt, steps=100, optimizer="lbfgs")
        return pred.mean, pred.predictive_variance, None
    raise ValueError(f"unknown method {method!r}")


def _gp_predict(reg: NTKRegressor, xt: Tensor) -> tuple[Tensor, Tensor]:
    post = reg.predict(xt)
    return post.mean, post.predictive_variance


def _run_setting(cfg: RunConfig, kind: str, seed: int, grid: dict, curves: list) -> list[dict]:
    """All methods on the T target tasks of one (setting, seed); returns per-task records."""
    sources, targets = sine_data.transfer_tasks(
        grid["tasks"], grid["n_source"], grid["nx"], seed=seed, source_kind=kind, dtype=DTYPE
    )
    src = sources[0]
    net = _source_net(cfg, src, kind, seed, grid["source_steps"])
    ablr = _ablr(cfg, src, kind, seed, grid["ablr_steps"])
    with torch.no_grad():
        source_var = residual_variance(net(src.x_train)[:, 0], src.y_train)
    lin = Linearized(net)
    records = []
    for t, task in enumerate(progress(targets, f"sine {kind}→sine seed {seed}")):
        keep = t < FIGURE_TASKS and seed == cfg.seed
        curve: dict[str, Any] = {"setting": kind, "task": t, "x": task.x_train, "y": task.y_train,
                                 "xt": task.x_test, "yt": task.y_test, "means": {}}
        shared: dict = {}
        base = {"setting": kind, "seed": seed, "task": t}
        gp_recs, auto = model_choice.ntk_gp_records(
            lin, task.x_train, task.y_train, task.x_test, _gp_predict,
            lambda m, v, yt=task.y_test: metrics.regression_metrics(m, v, yt), base)
        records += gp_recs
        if keep:
            post = auto.predict(task.x_test)
            curve["means"]["ntk_gp"] = post.mean.detach()
            curve["band"] = (post.mean - 2 * post.stddev, post.mean + 2 * post.stddev)
        for method in METHODS:
            if method in model_choice.METHODS:
                continue
            start = time.perf_counter()
            mean, var, std = _predict(method, task, net, lin, ablr, source_var, shared)
            seconds = time.perf_counter() - start
            rec = {**base, "method": method, "seconds": seconds}
            if method in NTK_GP:
                rec["log_marginal_likelihood"] = shared.pop("lml")
            rec.update(metrics.regression_metrics(mean, var, task.y_test))
            records.append(rec)
            if keep and method != "ntk_gp_weight":
                curve["means"][method] = mean.detach()
        if keep:
            curves.append(curve)
    return records


def _figure(curves: list[dict], out: Path) -> Path:
    """Grid of target tasks: data, truth, every method's mean, the NTK-GP ±2σ band."""
    plt = pyplot()
    rows = sorted({c["setting"] for c in curves}, key=SETTINGS.index)
    cols = max(sum(c["setting"] == r for c in curves) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.6 * cols, 3.0 * len(rows)), squeeze=False)
    styles = {"source": ("tab:gray", "--"), "ntk_gp": ("tab:red", "-"),
              "ntk_gp_constant": ("darkred", ":"), "ntk_gp_network": ("tab:orange", "-"),
              "finetune_all": ("tab:blue", "-"), "finetune_last": ("tab:cyan", "-"),
              "ablr": ("tab:green", "-"), "rbf_gp": ("tab:purple", "-")}
    for r, setting in enumerate(rows):
        for c, curve in enumerate([c for c in curves if c["setting"] == setting]):
            ax = axes[r, c]
            xt = curve["xt"][:, 0].numpy()
            lo, hi = (b.detach().numpy() for b in curve["band"])
            ax.fill_between(xt, lo, hi, color="tab:red", alpha=0.2, lw=0, label="NTK-GP ±2σ")
            ax.plot(xt, curve["yt"].numpy(), color="black", lw=2, label="truth")
            for method, mean in curve["means"].items():
                color, ls = styles[method]
                ax.plot(xt, mean.numpy(), color=color, ls=ls, lw=1.2, label=method)
            ax.scatter(curve["x"][:, 0].numpy(), curve["y"].numpy(), color="black", s=18, zorder=5,
                       label="target data")
            lim = 1.5 * float(curve["yt"].abs().max()) + 0.5
            ax.set_ylim(-lim, lim)
            ax.set_title(f"{setting}→sine, task {curve['task']}", fontsize=9)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, out, "sine_tasks.png")


def _space_agreement(records: list[dict]) -> dict[str, float]:
    """Max relative difference between the function- and weight-space GPs over all tasks."""
    key = ("setting", "seed", "task")
    f = {tuple(r[k] for k in key): r for r in records if r["method"] == "ntk_gp_constant"}
    w = {tuple(r[k] for k in key): r for r in records if r["method"] == "ntk_gp_weight"}
    out = {}
    for m, name in (("log_marginal_likelihood", "lml"), ("mse", "mse")):
        diffs = [abs(f[t][m] - w[t][m]) / (1 + abs(f[t][m])) for t in f if t in w]
        out[name] = max(diffs) if diffs else float("nan")
    return out


def run(cfg: RunConfig) -> dict:
    """Run the sine transfer experiment; returns (and writes to ``cfg.out``) the results dict.

    ``cfg.extra`` may override any grid entry (``seeds``, ``tasks``, ``nx``, ``n_source``,
    ``source_steps``, ``ablr_steps``) and ``threads`` (default ``$FNTK_THREADS`` or 1: these nets are tiny).
    """
    grid, seeds = experiment_grid(cfg, QUICK, FULL)
    start = time.perf_counter()
    records: list[dict] = []
    curves: list[dict] = []
    with torch_threads(default_threads(cfg)):
        for kind in SETTINGS:
            for seed in seeds:
                records += _run_setting(cfg, kind, seed, grid, curves)
        figure = _figure(curves, cfg.out)
    rows = summarize(model_choice.main_records(records), ("setting", "method"), METRICS)
    rows.sort(key=lambda r: (SETTINGS.index(r["setting"]), METHODS.index(r["method"])))
    table = format_table(rows, ("setting", "method"), METRICS)
    choice_rows, choice = model_choice.choice_table(records, ("setting",), ("mse", "nll"))
    agreement = _space_agreement(records)
    say(f"sine transfer: {grid['tasks']} target tasks × {len(seeds)} seeds, nx = {grid['nx']} "
        "(mean ± std over tasks and seeds; seconds per task)")
    say(table)
    say("model choice: every candidate (mean ± std over tasks and seeds), how often each criterion chose it")
    say(choice)
    say(f"function vs weight space at the same hyperparameters: max relative difference of the log "
        f"marginal likelihood {agreement['lml']:.1e}, of the test MSE {agreement['mse']:.1e}")
    results = {
        "experiment": "sine",
        "config": {**grid, "seed": cfg.seed, "quick": cfg.quick, "finetune": FINETUNE,
                   "source_lr": SOURCE_LR},
        "methods": list(METHODS),
        "summary": rows,
        "table": table,
        "choice_summary": choice_rows,
        "choice_table": choice,
        "space_agreement": agreement,
        "records": records,
        "figures": [str(figure)],
    }
    return finish(cfg, results, start, str(figure))
