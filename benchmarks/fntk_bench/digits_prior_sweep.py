"""How much of the digit-transfer gap to logistic regression is the evidence's choice of λ?

Sweeps the prior precision λ of ``LinearizedClassifier`` (Laplace, probit predictive; its MAP with
the plug-in softmax) over a grid, on the same labelled and test images as ``fntk run digits``
(5 seeds, 500 test images, test set held out from the m = 500 labelled set), for the last layer
and for all parameters, with the prior centred at θ̂ (and at zero for the last layer), and
prints mean test accuracy / NLL per λ next to the evidence's choice ("marglik"). An *oracle* λ
(picked on the test set) bounds what any single isotropic λ could reach.

    python -m fntk_bench.digits_prior_sweep --data ../shared/data [--target sklearn] [--ms 50 100]

Needs the ``pretrained_mnist_lenet5`` folder (and ``usps_esl_zip`` for USPS) under --data.
"""

from __future__ import annotations

import statistics
import time

import torch

from fntk import LinearizedClassifier, baselines, metrics
from fntk.data.digits import digits_transfer
from fntk.data.nets import load_pretrained_lenet5
from fntk.linearize import Linearized
from fntk.ntk import cached_kernels, kernel_pool
from fntk_bench.common import digits_args

GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, "marglik")
SETTINGS = (("last", "theta"), ("last", "zero"), ("all", "theta"))


def main() -> None:
    args = digits_args(__doc__)
    net = load_pretrained_lenet5(args.data)
    lins = {"last": Linearized(net, baselines.last_layer_names(net)), "all": Linearized(net)}
    scores: dict[tuple, list[tuple[float, float, float, float]]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        big = digits_transfer(args.target, 500, seed, root=args.data, n_test=500)
        xt, yt = big["x_test"], big["y_test"]
        for which in ("last", "all"):
            xl = digits_transfer(args.target, max(args.ms), seed, root=args.data, n_test=1)["x_train"]
            with kernel_pool(lins[which], torch.cat([xl, xt])), cached_kernels():
                for m in args.ms:
                    d = digits_transfer(args.target, m, seed, root=args.data, n_test=1)
                    for prior_mean, lam in [(pm, lam) for w, pm in SETTINGS if w == which for lam in GRID]:
                        clf = LinearizedClassifier(lins[which], prior_precision=lam, prior_mean=prior_mean)
                        clf.fit(d["x_train"], d["y_train"])
                        mean, _ = clf.predict_f(xt)
                        lap = metrics.classification_metrics(clf.predict_proba(xt), yt)
                        mp = metrics.classification_metrics(torch.softmax(mean.double(), -1), yt)
                        scores.setdefault((m, which, prior_mean, lam), []).append(
                            (lap["accuracy"], lap["nll"], mp["accuracy"], mp["nll"], clf.prior_precision_)
                        )
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{args.target}: mean over {args.seeds} seeds (Laplace = probit predictive; MAP = plug-in)")
    print("| m | params | prior mean | λ | Laplace acc | Laplace NLL | MAP acc | MAP NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for key, vals in scores.items():
        m, which, prior_mean, lam = key
        mean = [statistics.mean(v[i] for v in vals) for i in range(5)]
        shown = f"marglik (≈{statistics.median(v[4] for v in vals):.3g})" if lam == "marglik" else f"{lam:g}"
        print(
            f"| {m} | {which} | {prior_mean} | {shown} | {100 * mean[0]:.1f} | {mean[1]:.3f} | "
            f"{100 * mean[2]:.1f} | {mean[3]:.3f} |"
        )
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
