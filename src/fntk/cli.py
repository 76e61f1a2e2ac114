"""The ``fntk`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(_args: argparse.Namespace) -> int:
    """A small linearization demo: a tanh MLP, its Jacobian products and its NTK."""
    import torch

    from fntk import Linearized, NTKOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40), torch.nn.Tanh(), torch.nn.Linear(40, 1)
    ).double()
    x = torch.linspace(-5, 5, 200, dtype=torch.float64)[:, None]
    y = torch.sin(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    lin = Linearized(model)
    K = NTKOperator(lin, x[::20])
    v = torch.randn(lin.num_params, dtype=torch.float64)
    w = lin.theta + 1e-3 * v
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    torch.nn.utils.vector_to_parameters(w, model.parameters())
    f_w = model(x).detach()
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    gap = float((lin(x, w) - f_w).abs().max())
    print(f"tanh MLP with p = {lin.num_params} parameters, k = {lin.num_outputs} output")
    print(f"max |f_lin(x; θ̂+δ) − f(x; θ̂+δ)| for |δ| ~ 1e-3: {gap:.2e} (second order)")
    print("NTK on 10 points (diagonal):", [round(float(d), 2) for d in K.diagonal()])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fntk", description="Analytic transfer through linearized networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the main job: a short demonstration").set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
