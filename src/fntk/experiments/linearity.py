"""How linear is adaptation? The network versus its linearization at θ̂, by width.

The paper's "inductive biases of linearizations" study (amzn/xfer ``finite_ntk/notebooks/
relu_plots.ipynb``): one-hidden-layer ReLU networks 1-w-1, w in {5, 50, 500, 5000} (PyTorch's
default initialisation, float64), on its data: 300 inputs in two clusters N(±5, 0.8²) with targets
y = 0.1x² + |x| + 0.9ε, evaluated on a grid over [-15, 15] (so half of it is extrapolation).

θ̂ is either ``untrained`` (the initialisation) or ``trained`` (Adam, lr 3e-3, 1,000 full-batch steps
on a source task on the same inputs, y_src = 0.1x² + 0.9ε: the |x| kink is what adaptation must
add). From θ̂ we adapt to the target data three ways and compare on the grid:

- the network, trained by full-batch gradient descent on ½·mean squared error for T steps with
  step η = 1/λ_max(K/n) (K the NTK Gram of the data at θ̂): weights θ_T, function f(x; θ_T);
- the same gradient descent on the linearized model f_lin(x; w) = f(x; θ̂) + J(x)(w − θ̂), run in
  function space with the NTK at θ̂ (exactly equivalent to running it on w);
- the NTK-GP posterior mean (:class:`fntk.NTKRegressor`, prior mean f(x; θ̂) + b, hyperparameters
  learned), the Bayesian version of that linear model.

Residuals, relative to how far the network moved, r(g) = ‖f(·; θ_T) − g‖ / ‖f(·; θ_T) − f(·; θ̂)‖:
``taylor`` g = f_lin(·; θ_T) (the linearization at θ̂ evaluated at the trained weights),
``gd_linear`` g = the linearized model's own gradient-descent solution, ``ntk_gp`` g = the GP mean.
Also the MSE of each against the noiseless truth on the grid. Mean ± std over seeds.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fntk import baselines
from fntk.data.nets import mlp
from fntk.experiments.common import (
    RunConfig,
    cached_state,
    default_threads,
    experiment_grid,
    finish,
    progress,
    pyplot,
    save_figure,
    say,
    seeded,
    summary_table,
    torch_threads,
)
from fntk.gp import NTKRegressor
from fntk.linearize import Linearized
from fntk.ntk import ntk

DTYPE = torch.float64
STATES = ("untrained", "trained")
METRICS = ("taylor", "gd_linear", "ntk_gp", "mse_network", "mse_gd_linear", "mse_ntk_gp")
FULL = {"seeds": 3, "widths": (5, 50, 500, 5000), "steps": 1000, "n": 300, "grid": 400}
QUICK = {"seeds": 1, "widths": (5, 50, 500), "steps": 200, "n": 100, "grid": 200}
SOURCE = {"lr": 3e-3, "epochs": 1000}


def truth(x: Tensor, source: bool = False) -> Tensor:
    """The noiseless target 0.1x² + |x| (or the source task's 0.1x²); x (n, 1) → (n,)."""
    x = x[:, 0]
    return 0.1 * x**2 + (0.0 if source else x.abs())


def make_data(n: int, grid: int, seed: int) -> dict[str, Tensor]:
    """The paper's two-cluster inputs with source and target targets, and the evaluation grid."""
    g = torch.Generator().manual_seed(int(seed))
    half = n // 2
    x = torch.cat([0.8 * torch.randn(half, 1, generator=g, dtype=DTYPE) - 5.0,
                   0.8 * torch.randn(n - half, 1, generator=g, dtype=DTYPE) + 5.0])
    eps = torch.randn(2, n, generator=g, dtype=DTYPE)
    xg = torch.linspace(-15.0, 15.0, grid, dtype=DTYPE)[:, None]
    return {"x": x, "y": truth(x) + 0.9 * eps[0], "y_source": truth(x, True) + 0.9 * eps[1],
            "xg": xg, "yg": truth(xg)}


def _theta_hat(cfg: RunConfig, width: int, state: str, seed: int, data: dict) -> nn.Module:
    net = seeded(seed, lambda: mlp((1, width, 1), "relu").to(DTYPE)).eval()
    if state == "untrained":
        return net

    def train() -> nn.Module:
        return baselines.finetune(net, data["x"], data["y_source"], "all", "mse", SOURCE["epochs"],
                                  SOURCE["lr"], seed=seed)

    key = f"linearity_source_w{width}_seed{seed}_n{data['x'].shape[0]}_epochs{SOURCE['epochs']}"
    return cached_state(cfg.cache, key, train, net).eval()


def _gd_network(net: nn.Module, x: Tensor, y: Tensor, lr: float, steps: int) -> nn.Module:
    """Full-batch gradient descent on ½·mean (f − y)² from a copy of net (plain SGD, no momentum)."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (0.5 * (net(x)[:, 0] - y).square().mean()).backward()
        opt.step()
    return net.eval()


def _gd_linear(lin: Linearized, x: Tensor, y: Tensor, xg: Tensor, lr: float, steps: int,
               K: Tensor) -> Tensor:
    """The linearized model's gradient descent, in function space: u ← u − (η/n) K (u − y) on the
    data and g ← g − (η/n) K(grid, X)(u − y) on the grid. Returns g_T (grid,)."""
    n = x.shape[0]
    Kg = ntk(lin, xg, x)
    u, g = lin.forward(x)[:, 0], lin.forward(xg)[:, 0]
    for _ in range(steps):
        r = (lr / n) * (u - y)
        u, g = u - K @ r, g - Kg @ r
    return g


def _rel(a: Tensor, b: Tensor, scale: Tensor) -> float:
    return float((a - b).norm() / scale.norm().clamp_min(1e-300))


def _one(cfg: RunConfig, width: int, state: str, seed: int, data: dict, steps: int) -> tuple[dict, dict]:
    net0 = _theta_hat(cfg, width, state, seed, data)
    lin = Linearized(net0)
    x, y, xg, yg = data["x"], data["y"], data["xg"], data["yg"]
    K = ntk(lin, x)
    lr = float(1.0 / torch.linalg.eigvalsh(K / x.shape[0])[-1])
    net_T = _gd_network(net0, x, y, lr, steps)
    with torch.no_grad():
        f0, fT = lin.forward(xg)[:, 0], net_T(xg)[:, 0]
    theta_T = Linearized(net_T).theta
    taylor = lin(xg, theta_T)[:, 0]
    gd_lin = _gd_linear(lin, x, y, xg, lr, steps, K)
    post = NTKRegressor(lin).fit(x, y).predict(xg)
    moved = fT - f0
    rec = {
        "width": width, "state": state, "seed": seed, "params": lin.num_params, "lr": lr,
        "taylor": _rel(fT, taylor, moved), "gd_linear": _rel(fT, gd_lin, moved),
        "ntk_gp": _rel(fT, post.mean, moved),
        "mse_network": float((fT - yg).square().mean()),
        "mse_gd_linear": float((gd_lin - yg).square().mean()),
        "mse_ntk_gp": float((post.mean - yg).square().mean()),
    }
    curves = {"f0": f0, "fT": fT, "taylor": taylor, "gd_linear": gd_lin, "gp_mean": post.mean,
              "gp_std": post.stddev}
    return rec, curves


def _figure(curves: dict, data: dict, widths: tuple[int, ...], out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(len(STATES), len(widths), figsize=(3.6 * len(widths), 6.2), squeeze=False)
    xg = data["xg"][:, 0].numpy()
    for r, state in enumerate(STATES):
        for c, width in enumerate(widths):
            ax, cv = axes[r, c], {k: v.detach().numpy() for k, v in curves[(state, width)].items()}
            ax.fill_between(xg, cv["gp_mean"] - 2 * cv["gp_std"], cv["gp_mean"] + 2 * cv["gp_std"],
                            color="tab:red", alpha=0.15, lw=0, label="NTK-GP ±2σ")
            ax.scatter(data["x"][:, 0].numpy(), data["y"].numpy(), s=4, color="0.6", label="data")
            ax.plot(xg, data["yg"].numpy(), color="black", lw=1.5, label="truth")
            ax.plot(xg, cv["f0"], color="tab:gray", ls="--", lw=1, label="f(x; θ̂)")
            ax.plot(xg, cv["fT"], color="tab:blue", lw=1.5, label="network after GD")
            ax.plot(xg, cv["gd_linear"], color="tab:orange", ls="--", lw=1.5, label="linearized GD")
            ax.plot(xg, cv["gp_mean"], color="tab:red", ls=":", lw=1.5, label="NTK-GP mean")
            ax.set_ylim(-10, 45)
            ax.set_title(f"{state}, width {width}", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, out, "linearity.png")


def run(cfg: RunConfig) -> dict:
    """Run the linearity study; returns (and writes to ``cfg.out``) the results dict.

    ``cfg.extra`` may override ``seeds``, ``widths``, ``steps``, ``n``, ``grid`` and ``threads``
    (default ``$FNTK_THREADS`` or 1).
    """
    grid, seeds = experiment_grid(cfg, QUICK, FULL)
    widths = tuple(grid["widths"])
    start = time.perf_counter()
    records: list[dict] = []
    curves: dict = {}
    with torch_threads(default_threads(cfg)):
        for seed in seeds:
            data = make_data(grid["n"], grid["grid"], seed)
            jobs = [(s, w) for s in STATES for w in widths]
            for state, width in progress(jobs, f"linearity seed {seed}"):
                rec, cv = _one(cfg, width, state, seed, data, grid["steps"])
                records.append(rec)
                if seed == cfg.seed:
                    curves[(state, width)] = cv
            if seed == cfg.seed:
                figure = _figure(curves, data, widths, cfg.out)
    rows, table = summary_table(records, ("state", "width"), METRICS)
    say(f"linearity: 1-w-1 ReLU nets, {len(seeds)} seeds, {grid['steps']} GD steps; relative residuals "
        "‖f(θ_T) − g‖ / ‖f(θ_T) − f(θ̂)‖ on [-15, 15] and MSE against the truth")
    say(table)
    results = {
        "experiment": "linearity",
        "config": {**grid, "widths": list(widths), "seed": cfg.seed, "quick": cfg.quick, "source": SOURCE},
        "methods": ["taylor", "gd_linear", "ntk_gp"],
        "summary": rows,
        "table": table,
        "records": records,
        "figures": [str(figure)],
    }
    return finish(cfg, results, start, str(figure))
