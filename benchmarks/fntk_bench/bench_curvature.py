"""GGN/Fisher-vector product speed and accuracy: fntk.GGNOperator's three methods.

- 2-500-500-1 tanh MLP (p = 251,501), n = 2000 inputs of dimension 2, Gaussian likelihood;
- LeNet-5-like CNN (conv 1→32 k3, ReLU, pool, conv 32→64 k3, ReLU, pool, 3136→200, ReLU, 200→10;
  p = 647,742), n = 500 28×28 inputs, categorical likelihood.

Times one product G @ V with r = 1 and r = 16 columns for each method, divided by the time of one
forward+backward (the gradient of the summed loss) over the same data. Accuracy: relative error of
each float32 method against the exact product computed in float64, with the finite-difference
step ε swept. Also the exact diagonal's time. Results go to the "Curvature products" section of
benchmarks/RESULTS.md (not with --quick).

    python -m fntk_bench.bench_curvature [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import fntk
from fntk import likelihoods as L
from fntk_bench.common import machine_note, mlp, write_section

METHODS = ("exact", "finite_difference", "autograd")
EPS = (1e-2, 1e-3, 1e-4, 1e-5)
R_ACC = 8  # columns for the accuracy comparison


def lenet(dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3136, 200),
        nn.ReLU(),
        nn.Linear(200, 10),
    ).to(dtype)


def problem(name: str, n: int, dtype=torch.float32):
    """(model, x, y, likelihood, loss for the gradient baseline)."""
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = mlp([2, 500, 500, 1], dtype=dtype)
        x = torch.randn(n, 2, generator=g).to(dtype)
        y = torch.sin(3 * x[:, :1]) + 0.1 * torch.randn(n, 1, generator=g).to(dtype)
        return model, x, y, L.Gaussian(1.0), lambda out: 0.5 * ((out - y) ** 2).sum()
    model = lenet(dtype)
    x = torch.randn(n, 1, 28, 28, generator=g).to(dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, x, y, L.Categorical(), lambda out: nn.functional.cross_entropy(out, y, reduction="sum")


def interleaved_best(fns: dict, rounds: int) -> dict:
    """Best wall time of each callable over ``rounds`` round-robin rounds after one warm-up each.

    Round-robin, so that load from other jobs on the machine hits every callable alike."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def run(name: str, n: int, rounds: tuple[int, int]) -> dict:
    model, x, y, lik, loss = problem(name, n)
    lin = fntk.Linearized(model)
    p = lin.num_params
    m = copy.deepcopy(model)  # the timed gradient uses its own copy

    def gradient():
        m.zero_grad(set_to_none=True)
        loss(m(x)).backward()

    g = torch.Generator().manual_seed(2)
    V16 = torch.randn(p, 16, generator=g)
    ops = {method: fntk.GGNOperator(lin, x, lik, method=method) for method in METHODS}
    res = {"name": name, "n": n, "p": p, "times": {}, "acc": []}
    for r, nr in zip((1, 16), rounds):
        fns = {"grad": gradient}
        fns.update({(method, r): (lambda op=op, V=V16[:, :r]: op @ V) for method, op in ops.items()})
        best = interleaved_best(fns, nr)
        res["grad", r] = best.pop("grad")
        res["times"].update(best)
    res["grad"] = min(res["grad", 1], res["grad", 16])
    t0 = time.perf_counter()
    ops["exact"].diagonal()
    res["diag"] = time.perf_counter() - t0
    # accuracy against the exact float64 product (a float64 copy of the same network)
    lin64 = fntk.Linearized(copy.deepcopy(model).double())
    VA = V16[:, :R_ACC]
    ref = fntk.GGNOperator(lin64, x.double(), lik) @ VA.double()

    def err(out):
        return float(((out.double() - ref).norm(dim=0) / ref.norm(dim=0)).median())

    for method, eps in [("exact", None), ("autograd", None)] + [("finite_difference", e) for e in EPS]:
        op = fntk.GGNOperator(lin, x, lik, method=method, eps=eps or 1e-4)
        res["acc"].append((method, eps, "float32", err(op @ VA)))
    for eps in EPS:  # finite differences in float64 isolate the O(ε) truncation error
        op = fntk.GGNOperator(lin64, x.double(), lik, method="finite_difference", eps=eps)
        res["acc"].append(("finite_difference", eps, "float64", err(op @ VA.double())))
    return res


def table(results: list[dict], rounds: tuple[int, int]) -> str:
    lines = [
        "One product G @ V (r columns) over all n points, float32, divided by the time of one "
        "forward+backward (the gradient of the summed loss) over the same points. Best of "
        f"{rounds[0]} (r = 1) / {rounds[1]} (r = 16) round-robin rounds after a warm-up; the gradient is "
        "timed in the same rounds as the products it divides.",
        "",
        "| network | n | p | gradient (s) | method | r = 1 (s) | r = 1 / grad | r = 16 (s) | r = 16 / grad |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        label = "2-500-500-1 tanh MLP, Gaussian" if res["name"] == "mlp" else "LeNet-5-like CNN, categorical"
        g1, g16 = res["grad", 1], res["grad", 16]
        for method in METHODS:
            t1, t16 = res["times"][(method, 1)], res["times"][(method, 16)]
            lines.append(
                f"| {label} | {res['n']} | {res['p']:,} | {res['grad']:.3f} | {method} | {t1:.3f} "
                f"| {t1 / g1:.2f} | {t16:.3f} | {t16 / g16:.2f} |"
            )
    lines += [
        "",
        "Exact diagonal (one call): "
        + ", ".join(f"{r['name']} {r['diag']:.2f} s ({r['diag'] / r['grad']:.1f} gradients)" for r in results)
        + ".",
        "",
        f"Accuracy versus time ({R_ACC} random directions): median over directions of "
        "‖G v − (G v)_exact,float64‖ / ‖(G v)_exact,float64‖, next to the float32 time of r = 16 products "
        "in gradients (from the table above; the finite-difference cost does not depend on ε).",
        "",
        "| network | method | ε | dtype | rel. error | time, r = 16 (gradients) |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        for method, eps, dt, e in res["acc"]:
            ts = f"{res['times'][(method, 16)] / res['grad', 16]:.1f}" if dt == "float32" else ""
            lines.append(
                f"| {res['name']} | {method} | {'' if eps is None else f'{eps:g}'} | {dt} | {e:.1e} | {ts} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="n = 200 / 50, fewer rounds, no RESULTS.md")
    args = ap.parse_args()
    rounds = (2, 1) if args.quick else (15, 3)
    sizes = {"mlp": 200, "cnn": 50} if args.quick else {"mlp": 2000, "cnn": 500}
    results = [run(name, n, rounds) for name, n in sizes.items()]
    body = (
        table(results, rounds)
        + "\n\n"
        + machine_note()
        + " The machine is shared: other developers' jobs ran concurrently (load average 5-10 on 2 "
        "cores), so absolute times are inflated and noisy; the ratios are the figures to read."
    )
    print(body)
    if not args.quick:
        write_section("Curvature products", body)


if __name__ == "__main__":
    main()
