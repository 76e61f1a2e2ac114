"""Strong scaling over torch.distributed (gloo, loopback): 1 versus 2 ranks on this machine.

Times (rank 0, best of 3) of a matrix-free NTK product K V (2-500-500-1 tanh MLP, n = 2000,
r = 16) and of NTKRegressor.fit at fixed hyperparameters in weight space (matrix-free CG).

    python -m fntk_bench.bench_distributed [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fntk_bench.common import machine_note, mlp, write_section


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier() if dist.is_initialized() else None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def worker(rank: int, world: int, port: int, n: int, repeats: int, out: str) -> None:
    import fntk

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
    try:
        model = mlp([2, 500, 500, 1], dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 2, generator=g, dtype=torch.float64)
        y = torch.sin(x.sum(1))
        V = torch.randn(n, 16, generator=g, dtype=torch.float64)
        op = fntk.NTKOperator(fntk.Linearized(model), x, dense=False)
        t_prod = _best(lambda: op @ V, repeats)

        def fit():
            reg = fntk.NTKRegressor(model, space="weight", noise=0.1, optimize=False)
            reg.fit(x, y)

        t_fit = _best(fit, repeats)
        if rank == 0:
            torch.save({"product": t_prod, "fit": t_fit}, out)
    finally:
        if world > 1:
            dist.barrier()  # gloo can abort a rank whose peer tears down first
            dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, repeats = (500, 1) if args.quick else (2000, 3)
    res = {}
    for world in (1, 2):
        out = f"/tmp/fntk_bench_dist_{world}.pt"
        mp.spawn(worker, args=(world, _port(), n, repeats, out), nprocs=world)
        res[world] = torch.load(out, weights_only=True)
    lines = [
        f"2-500-500-1 tanh MLP, n = {n}, float64, gloo over loopback, torch threads = 2 / ranks.",
        machine_note(),
        "",
        "| task | 1 rank (s) | 2 ranks (s) | speed-up |",
        "|---|---|---|---|",
    ]
    for key, label in (("product", "matrix-free K V, r = 16"), ("fit", "NTKRegressor.fit, weight space")):
        a, b = res[1][key], res[2][key]
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("Distributed strong scaling (issue 8)", body)


if __name__ == "__main__":
    main()
