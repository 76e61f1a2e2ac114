"""The default noise hyperprior of the NTK-GP model choice on the sine transfer tasks.

For each (centre θ₀, width w) of the log-normal prior log σ² ~ N(log θ₀, w²) (standardised units;
:mod:`fntk.gp.priors`), ``NTKRegressor(net)`` (the default model choice) on the 20 target tasks × 3
seeds of ``fntk run sine`` (nx = 10, source networks trained as there, 2,000 Adam steps), scored on
the noiseless test grid: mean test MSE, NLL and 95% coverage per setting.

    python -m fntk_bench.noise_prior_sweep [--seeds 3] [--tasks 20]
"""

from __future__ import annotations

import argparse

import torch

from fntk import baselines, metrics
from fntk.data import sine as sine_data
from fntk.data.nets import mlp
from fntk.gp import NTKRegressor, priors
from fntk.linearize import Linearized

PRIORS = ((0.1, 2.0), (0.01, 3.0), (1e-3, 3.0))
DT = torch.float64


def _source(task, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = mlp((1, 40, 40, 1), "tanh").to(DT)
    return baselines.finetune(net, task.x_train, task.y_train, "all", "mse", 2000, 1e-2, seed=seed).eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    default = (priors.DEFAULT_NOISE_CENTER, priors.NOISE_WIDTH)
    print("| setting | noise prior θ₀, w | mse | nll | coverage |\n|---|---|---|---|---|")
    try:
        for kind in ("sine", "linear"):
            tasks = []
            for seed in range(args.seeds):
                sources, targets = sine_data.transfer_tasks(args.tasks, 100, 10, seed=seed,
                                                            source_kind=kind, dtype=DT)
                tasks += [(Linearized(_source(sources[0], seed)), t) for t in targets]
            for center, width in PRIORS:
                priors.DEFAULT_NOISE_CENTER, priors.NOISE_WIDTH = center, width
                scores = []
                for lin, task in tasks:
                    post = NTKRegressor(lin).fit(task.x_train, task.y_train).predict(task.x_test)
                    scores.append(metrics.regression_metrics(post.mean, post.predictive_variance,
                                                             task.y_test))
                mean = {k: sum(s[k] for s in scores) / len(scores) for k in ("mse", "nll", "coverage")}
                print(f"| {kind} | {center:g}, {width:g} | {mean['mse']:.3g} | {mean['nll']:.3g} | "
                      f"{mean['coverage']:.3g} |", flush=True)
    finally:
        priors.DEFAULT_NOISE_CENTER, priors.NOISE_WIDTH = default


if __name__ == "__main__":
    main()
