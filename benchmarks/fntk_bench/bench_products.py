"""NTK-vector product speed: fntk.NTKOperator @ V against the paper code's column loop.

2-500-500-1 tanh MLP, n = 2000 inputs of dimension 2, r = 16 columns, float32 and float64.
Also the ratio of one NTKOperator @ V to r plain forward+backward passes (the physical reference
for a kernel product: J(JᵀV) needs at least one backward and one forward-mode pass per column).

    python -m fntk_bench.bench_products [--quick]
"""

from __future__ import annotations

import argparse

import torch

import fntk
from fntk_bench.common import best_time, machine_note, mlp, write_section
from fntk_bench.paper_baseline import paper_ntk_matmul


def run(n: int, r: int, dtype: torch.dtype, repeats: int) -> dict:
    model = mlp([2, 500, 500, 1], dtype=dtype)
    x = torch.randn(n, 2, dtype=dtype)
    V = torch.randn(n, r, dtype=dtype)
    lin = fntk.Linearized(model)
    free = fntk.NTKOperator(lin, x, dense=False)
    ours = free @ V
    ref = paper_ntk_matmul(model, x, V[:, None, :])[:, 0]
    err = float((ours - ref).norm() / ref.norm())
    t_free = best_time(lambda: free @ V, repeats)
    t_free_first = best_time(lambda: fntk.NTKOperator(lin, x, dense=False) @ V, repeats)
    # auto: a fresh operator each time, so the time includes forming the dense kernel once
    t_ours = best_time(lambda: fntk.NTKOperator(lin, x) @ V, repeats)
    cached = fntk.NTKOperator(lin, x)
    cached @ V
    t_again = best_time(lambda: cached @ V, repeats)
    t_paper = best_time(lambda: paper_ntk_matmul(model, x, V[:, None, :]), repeats)

    def fwd_bwd():
        for _ in range(r):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

    t_grad = best_time(fwd_bwd, repeats)
    model.zero_grad(set_to_none=True)
    return dict(
        dtype=str(dtype).replace("torch.", ""),
        ours=t_ours,
        free=t_free,
        free_first=t_free_first,
        again=t_again,
        paper=t_paper,
        grad=t_grad,
        err=err,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="n = 500, one repeat")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine 2 threads ran 10x slower under load)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, r, repeats = (500, 16, 1) if args.quick else (2000, 16, 3)
    rows = [run(n, r, dt, repeats) for dt in (torch.float32, torch.float64)]
    lines = [
        f"2-500-500-1 tanh MLP (p = 251,501), n = {n}, r = {r}. Best of {repeats} after a warm-up.",
        machine_note(),
        "",
        "| dtype | paper column loop (s) | NTKOperator @ V, auto (s) | speed-up | matrix-free "
        "(dense=False) (s) | speed-up | matrix-free, first product (s) | next product, cached (s) "
        "| r × (fwd+bwd) (s) | auto / r·grad | matrix-free / r·grad | first matrix-free / r·grad "
        "| rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in rows:
        lines.append(
            f"| {w['dtype']} | {w['paper']:.3f} | {w['ours']:.3f} | {w['paper'] / w['ours']:.1f}x "
            f"| {w['free']:.3f} | {w['paper'] / w['free']:.1f}x | {w['free_first']:.3f} | {w['again']:.4f} "
            f"| {w['grad']:.3f} | {w['ours'] / w['grad']:.2f} | {w['free'] / w['grad']:.2f} "
            f"| {w['free_first'] / w['grad']:.2f} | {w['err']:.1e} |"
        )
    lines += [
        "",
        "auto: the first product forms the exact kernel by the structured per-layer Gram (fntk.ntk) "
        "and caches it, because that costs less than a few matrix-free products; every later "
        "product (CG, Lanczos, predictions) is one n×n matmul. matrix-free: J(x)(J(x)ᵀV) for all r "
        "columns at once; on this network of Linear layers from layer taps and two GEMMs per layer "
        "(fntk.linearize.tapped; the taps are kept, so a product on an operator that has multiplied "
        "before costs the GEMMs alone; the first product includes one forward and one backward for "
        "the taps), elsewhere one batched vjp and one batched jvp vmapped over the columns.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("NTK-vector products (issue 2)", body)


if __name__ == "__main__":
    main()
