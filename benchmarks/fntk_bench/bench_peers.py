"""fntk side by side with the libraries users would pick instead, timed in one process.

- ``ggn``: one GGN product G V with r = 1 and r = 16 columns, in gradients per column (time /
  (r × one forward+backward of the summed loss)): fntk's ``GGNOperator`` (exact; "fntk" is a
  product on an operator that has multiplied before, as in CG or Lanczos, "fntk, first product" a
  fresh operator per product, its construction and the layer taps included), curvlinops'
  ``GGNLinearOperator`` and BackPACK's ``ggn_vector_product_from_plist`` (one column at a time) on
  the 2-500-500-1 MLP (n = 2000, Gaussian) and the LeNet-5-like CNN (n = 500, categorical) of
  ``bench_curvature``; the products are checked to agree (relative error against fntk's).
- ``last_layer``: MNIST LeNet-5 (``pretrained_mnist_lenet5``) → scikit-learn digits, 500 test
  images, m = 100 and 500 labels: laplace-torch's last-layer Laplace (Kronecker-factored and full
  GGN, marginal-likelihood prior precision, probit predictive) against fntk's last-layer
  ``LinearizedClassifier`` (Laplace, evidence λ, probit; the exact last-layer backend), and fntk's
  fit at that λ fixed — seconds for fit + prior precision + predict, accuracy and NLL; the Kronecker
  and fntk rows are the best of ``rounds`` round-robin rounds after a warm-up (the full-GGN row one
  run). laplace-torch keeps the network's weights as the mean; fntk moves it to the linearized MAP.

Needs the peers (``make bench-peers`` installs them into .venv without touching torch): laplace-torch
0.3, curvlinops-for-pytorch, backpack-for-pytorch. One torch thread. Results go to the "Peers"
section of benchmarks/RESULTS.md (not with --quick).

    python -m fntk_bench.bench_peers [--quick] [--data PATH] [--studies last_layer ggn]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fntk
from fntk import baselines, metrics
from fntk.data.digits import digits_transfer
from fntk.data.nets import load_pretrained_lenet5
from fntk_bench.bench_curvature import interleaved_best, problem
from fntk_bench.common import machine_note, write_section


def _peers():
    """The peer libraries (ImportError naming the install command when absent)."""
    try:
        import backpack.hessianfree.ggnvp as backpack_ggnvp
        import curvlinops
        import laplace
    except ImportError as err:
        raise ImportError(
            f"bench_peers needs the peer libraries ({err}); install them with `make bench-peers`"
        ) from err
    return backpack_ggnvp, curvlinops, laplace


# ---------------------------------------------------------------------------------- GGN products
def ggn_study(name: str, n: int, rounds: int) -> list[dict]:
    backpack_ggnvp, curvlinops, _ = _peers()
    model, x, y, lik, loss_fn = problem(name, n)
    params = [p for p in model.parameters() if p.requires_grad]
    lin = fntk.Linearized(model)
    op = fntk.GGNOperator(lin, x, lik, y=y)
    # curvlinops: Σ_i loss_i with the Hessian fntk uses (MSE sum has Hessian 2I: halve it)
    if name == "mlp":
        loss_func, scale = nn.MSELoss(reduction="sum"), 0.5
    else:
        loss_func, scale = nn.CrossEntropyLoss(reduction="sum"), 1.0
    cl = curvlinops.GGNLinearOperator(model, loss_func, params, [(x, y)], check_deterministic=False)
    p = lin.num_params
    sizes = [q.numel() for q in params]

    def grad():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()

    def backpack_columns(V):
        out = []
        for j in range(V.shape[1]):
            output = model(x)
            loss = loss_func(output, y) * scale
            v = [t.reshape(q.shape) for t, q in zip(torch.split(V[:, j], sizes), params)]
            Gv = backpack_ggnvp.ggn_vector_product_from_plist(loss, output, params, v)
            out.append(torch.cat([g.reshape(-1) for g in Gv]))
        return torch.stack(out, 1)

    rows = []
    for r in (1, 16):
        V = torch.randn(p, r, generator=torch.Generator().manual_seed(r), dtype=x.dtype)
        ref = op @ V
        for label, got in (("curvlinops", scale * (cl @ V)), ("backpack", backpack_columns(V))):
            err = float((got - ref).norm() / ref.norm())
            assert err < 1e-3, (label, err)  # float32 products agree
        best = interleaved_best({
            "grad": grad,
            "fntk": lambda V=V: op @ V,
            "fntk, first product": lambda V=V: fntk.GGNOperator(lin, x, lik, y=y) @ V,
            "curvlinops": lambda V=V: cl @ V,
            "backpack": lambda V=V: backpack_columns(V),
        }, rounds)
        for method in ("fntk", "fntk, first product", "curvlinops", "backpack"):
            rows.append({"study": "ggn", "case": f"{name} n={n}", "r": r, "method": method,
                         "seconds": best[method], "gradients_per_column": best[method] / (r * best["grad"])})
    return rows


# ---------------------------------------------------------------------------------- last layer
def last_layer_study(root, m: int, n_test: int, seed: int, rounds: int) -> list[dict]:
    _, _, laplace = _peers()
    net = load_pretrained_lenet5(root).eval()
    data = digits_transfer("sklearn", m, seed, root, n_test=n_test)
    x, y, xt, yt = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    names = baselines.last_layer_names(net)
    out: dict = {}

    def peer(structure):
        la = laplace.Laplace(net, "classification", subset_of_weights="last_layer",
                             hessian_structure=structure)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
        la.fit(loader)
        la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
        with torch.no_grad():
            out[structure] = (la(xt, pred_type="glm", link_approx="probit"), float(la.prior_precision.mean()))

    def ours(lam, key):
        clf = fntk.LinearizedClassifier(net, names, inference="laplace", prior_precision=lam).fit(x, y)
        out[key] = (clf.predict_proba(xt), clf.prior_precision_, clf.space_, clf.fit_seconds_)

    ours("marglik", "fntk")  # λ for the fixed-λ row
    lam = out["fntk"][1]
    best = interleaved_best({"kron": lambda: peer("kron"), "fntk": lambda: ours("marglik", "fntk"),
                             "fixed": lambda: ours(lam, "fixed")}, rounds)
    t0 = time.perf_counter()
    peer("full")
    best["full"] = time.perf_counter() - t0
    labels = {"kron": "laplace-torch last layer kron, marglik",
              "full": "laplace-torch last layer full, marglik",
              "fntk": "fntk last layer, evidence", "fixed": "fntk last layer, λ fixed at the evidence's"}
    rows = []
    for key in ("kron", "full", "fntk", "fixed"):
        mt = metrics.classification_metrics(out[key][0], yt)
        row = {"study": "last_layer", "case": f"sklearn digits m={m}", "method": labels[key],
               "seconds": best[key], "accuracy": mt["accuracy"], "nll": mt["nll"],
               "prior_precision": out[key][1]}
        if key in ("fntk", "fixed"):
            row.update(space=out[key][2], fit_seconds=out[key][3])
        rows.append(row)
    rows[2]["vs_kron"] = best["fntk"] / best["kron"]
    rows[2]["search_vs_fixed_fit"] = out["fntk"][3] / out["fixed"][3]
    return rows


def _table(rows: list[dict], cols: tuple[str, ...]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "\n".join("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows)


def _ggn_section(quick: bool) -> str:
    sizes = {"mlp": 200, "cnn": 50} if quick else {"mlp": 2000, "cnn": 500}
    rows = [row for name, n in sizes.items() for row in ggn_study(name, n, 1 if quick else 3)]
    return ("GGN products (gradients per column; lower is better):\n\n"
            + _table(rows, ("case", "r", "method", "seconds", "gradients_per_column")))


def _last_layer_section(data, quick: bool) -> str:
    ms = (100,) if quick else (100, 500)
    # 7 rounds: on this shared machine a best of 3 moved the fntk / laplace-torch ratio by ±10%
    rows = [row for m in ms for row in last_layer_study(data, m, 100 if quick else 500, 0, 1 if quick else 7)]
    cols = ("case", "method", "seconds", "accuracy", "nll", "prior_precision", "space", "fit_seconds",
            "vs_kron", "search_vs_fixed_fit")
    return ("Last-layer Laplace, MNIST LeNet-5 → scikit-learn digits (seed 0); seconds: fit, prior precision "
            "and predictive on 500 test images; fit_seconds: fntk's fit alone; vs_kron: fntk's seconds / "
            "laplace-torch Kronecker's; search_vs_fixed_fit: the fit with the evidence search / the fit at "
            "that λ:\n\n" + _table(rows, cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, no RESULTS.md")
    ap.add_argument("--data", default=None, help="folder laid out like shared/data (last_layer)")
    ap.add_argument("--studies", nargs="+", default=["last_layer", "ggn"], choices=["ggn", "last_layer"],
                    help="run in this order: a study's timings depend on what ran before in the process "
                         "(after the GGN study laplace-torch's temporaries no longer fault in fresh pages)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    sections = [_ggn_section(args.quick) if study == "ggn" else _last_layer_section(args.data, args.quick)
                for study in args.studies]
    body = "\n\n".join(sections)
    print(body)
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    if not args.quick:
        head = "`make bench-peers` — fntk and laplace-torch 0.3, curvlinops, BackPACK in one process."
        order = ", then ".join(args.studies)
        title = "Peers" if args.studies == ["last_layer", "ggn"] else f"Peers ({order})"
        write_section(title, f"{head} {machine_note()}\n\n{body}\n\nTotal {total:.0f} s.")


if __name__ == "__main__":
    main()
