"""Two design choices of the NTK-GP model choice, measured on the sine transfer tasks of ``fntk run
sine`` (20 target tasks × 3 seeds per setting, source networks trained as there, 2,000 Adam steps,
scored on the noiseless test grid: mean test MSE, NLL and 95% coverage):

- ``--study noise``: the default noise hyperprior log σ² ~ N(log θ₀, w²) (standardised units,
  :mod:`fntk.gp.priors`) for three (θ₀, w), ``NTKRegressor(net)`` at nx = 10;
- ``--study small_n``: the choice (forced below ``MIN_CHOICE_N``) against the plain "network" and
  "constant" models at nx = 5 and 8 (:data:`fntk.gp.models.MIN_CHOICE_N`).

    python -m fntk_bench.model_choice_sine [--study noise|small_n] [--seeds 3] [--tasks 20]
"""

from __future__ import annotations

import argparse

import torch

from fntk import baselines, metrics
from fntk.data import sine as sine_data
from fntk.data.nets import mlp
from fntk.gp import NTKRegressor, models, priors
from fntk.linearize import Linearized

PRIORS = ((0.1, 2.0), (0.01, 3.0), (1e-3, 3.0))
DT = torch.float64


def _source(task, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = mlp((1, 40, 40, 1), "tanh").to(DT)
    return baselines.finetune(net, task.x_train, task.y_train, "all", "mse", 2000, 1e-2, seed=seed).eval()


def _tasks(kind: str, nx: int, seeds: int, n_tasks: int) -> list:
    tasks = []
    for seed in range(seeds):
        sources, targets = sine_data.transfer_tasks(n_tasks, 100, nx, seed=seed, source_kind=kind, dtype=DT)
        lin = Linearized(_source(sources[0], seed))
        tasks += [(lin, t) for t in targets]
    return tasks


def _row(label: str, tasks: list, **kw) -> str:
    scores = []
    for lin, task in tasks:
        post = NTKRegressor(lin, **kw).fit(task.x_train, task.y_train).predict(task.x_test)
        scores.append(metrics.regression_metrics(post.mean, post.predictive_variance, task.y_test))
    mean = {k: sum(s[k] for s in scores) / len(scores) for k in ("mse", "nll", "coverage")}
    return f"| {label} | {mean['mse']:.3g} | {mean['nll']:.3g} | {mean['coverage']:.3g} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", choices=("noise", "small_n"), default="noise")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    default = (priors.DEFAULT_NOISE_CENTER, priors.NOISE_WIDTH, models.MIN_CHOICE_N)
    print("| setting, case | mse | nll | coverage |\n|---|---|---|---|")
    try:
        for kind in ("sine", "linear"):
            if args.study == "noise":
                tasks = _tasks(kind, 10, args.seeds, args.tasks)
                for center, width in PRIORS:
                    priors.DEFAULT_NOISE_CENTER, priors.NOISE_WIDTH = center, width
                    print(_row(f"{kind}, θ₀ = {center:g}, w = {width:g}", tasks), flush=True)
                continue
            models.MIN_CHOICE_N = 1
            for nx in (5, 8):
                tasks = _tasks(kind, nx, args.seeds, args.tasks)
                for label, kw in (("choice", {}), ("network", {"mean": "network"}),
                                  ("constant", {"mean": "constant"})):
                    print(_row(f"{kind}, nx = {nx}, {label}", tasks, **kw), flush=True)
    finally:
        priors.DEFAULT_NOISE_CENTER, priors.NOISE_WIDTH, models.MIN_CHOICE_N = default


if __name__ == "__main__":
    main()
