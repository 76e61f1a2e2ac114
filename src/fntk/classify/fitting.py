"""The fit procedure of :class:`~fntk.classify.LinearizedClassifier`: backend choice, the MAP
at a fixed, evidence-maximising or cross-validated prior precision λ, and the VI stage.

Functions of the classifier object (its options in, its fitted attributes out), so that the class
keeps only its interface; they run under the classifier's lock and transaction.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fntk.classify import cost
from fntk.classify import cv as _cv
from fntk.classify import meanfield as _mf
from fntk.classify import vi as _vi
from fntk.classify.evidence import MarglikInfo, optimize_prior_precision
from fntk.classify.function_space import FunctionSpace
from fntk.classify.labels import check_labels
from fntk.classify.last_layer import LastLayer
from fntk.classify.objective import F64, FitInfo, prior_mean_function
from fntk.classify.weight_space import WeightSpace
from fntk.likelihoods import Bernoulli, Categorical, Likelihood

#: a LinearizedClassifier (this module is imported by it, so not imported here)
Classifier = Any

#: the fitted MAP backends
Backend = FunctionSpace | WeightSpace | LastLayer


def fit(clf: Classifier, x: Tensor, y: Tensor, callback: Callable[[dict], None] | None) -> None:
    """Fit ``clf`` on checked-once inputs x (n, *features) and labels y (n,): the backend the cost
    model picks (function space, weight space or the exact last layer), the MAP at λ (fixed,
    the evidence's or cross-validated), then VI if asked. Sets the fitted attributes; the caller
    (:meth:`LinearizedClassifier.fit`) makes it transactional."""
    t0 = time.perf_counter()
    x = clf.lin.check_input(x)
    n, k = x.shape[0], clf.lin.num_outputs
    y = check_labels(y, n, k).to(clf.lin.device)
    space, dense = cost.choose(clf.lin, n, k, clf.space, clf.solver, clf.covariance)
    clf.likelihood_: Likelihood = Categorical() if k >= 2 else Bernoulli()
    marglik = clf.prior_precision == "marglik"
    plan = cost.last_layer_plan(
        clf.lin, x, clf.likelihood_, clf.space, clf.solver, clf.covariance, marglik
    )
    if plan is not None:  # a final linear layer on fixed features: the exact Kronecker backend
        space, seconds = "last-layer", plan.seconds
    else:
        seconds = cost.estimate_seconds(clf.lin, x, space, dense, clf.solver, marglik, clf.rank)
    cost.check_time(seconds, clf.time_limit, n, clf.lin.num_params, f"{space} space")
    clf._y = y if k >= 2 else y.to(F64)[:, None]
    clf.num_classes_ = max(k, 2)
    mu0 = None
    if clf.prior_mean == "zero":
        mu0 = torch.zeros(clf.lin.num_params, dtype=F64, device=clf.lin.device)
    if plan is not None:
        backend: Backend = LastLayer(clf.lin, x, clf._y, clf.likelihood_, mu0, plan.info, plan.factor)
    elif space == "function":
        backend = FunctionSpace(clf.lin, x, clf._y, clf.likelihood_, mu0)
    else:
        backend = WeightSpace(
            clf.lin,
            x,
            clf._y,
            clf.likelihood_,
            mu0,
            dense=dense,
            rank=clf.rank,
            solver=clf.solver,
            batch_size=clf.batch_size,
        )
    backend.callback = callback
    clf.space_ = space if space != "weight" else ("weight-dense" if dense else "weight-lowrank")
    clf.estimated_seconds_ = seconds
    try:
        if clf.prior_precision == "marglik":
            lam, info, ml = optimize_prior_precision(backend, clf.tol, clf.max_iter)
        elif clf.prior_precision == "cv":
            lam, ml = cross_validate(clf, x, y, space, callback), MarglikInfo()
            info = backend.fit(lam, clf.tol, clf.max_iter)
        else:
            lam, ml = float(clf.prior_precision), MarglikInfo()
            info = backend.fit(lam, clf.tol, clf.max_iter)
    finally:
        backend.callback = None  # not kept with the fitted state
    clf._backend = None  # fitted only once every stage has finished
    set_map_info(clf, lam, info, ml)
    if clf.inference == "vi":
        fit_vi(clf, backend, x, callback)
    clf._backend = backend
    clf.fit_seconds_ = time.perf_counter() - t0


def cross_validate(clf: Classifier, x: Tensor, y: Tensor, space: str,
                   callback: Callable[[dict], None] | None) -> float:
    """λ̂ by K-fold cross-validation (:mod:`fntk.classify.cv`): fits of copies of this classifier
    (same options, a fixed λ) on the training folds; sets ``cv_history_``."""
    grid, folds = clf.cv_grid, clf.cv_folds
    cost.check_time(clf.estimated_seconds_ * (folds * len(grid) + 1), clf.time_limit, x.shape[0],
                    clf.lin.num_params, f"{space} space, {folds}-fold CV over {len(grid)} λ")

    def fit_predict(x_tr: Tensor, y_tr: Tensor, x_va: Tensor, lam: float) -> Tensor:
        fold = copy.copy(clf)  # this classifier's options, its own state and lock
        fold.prior_precision, fold.progress, fold._backend = lam, False, None
        fold._lock = threading.RLock()
        with warnings.catch_warnings():  # a fold fit short of tol still scores its fold
            warnings.filterwarnings("ignore", "MAP solve stopped", RuntimeWarning)
            fit(fold, x_tr, y_tr, callback)
        return fold.predict_proba(x_va)

    lam, clf.cv_history_ = _cv.cross_validate(fit_predict, x, y, grid, folds, clf.seed)
    return lam


def set_map_info(clf: Classifier, lam: float, info: FitInfo, ml: MarglikInfo) -> None:
    """The MAP solve's results as attributes; a RuntimeWarning when it stopped short of tol."""
    clf.prior_precision_ = lam
    clf.converged_, clf.n_iter_, clf.grad_norm_ = info.converged, info.n_iter, info.grad_norm
    clf.map_history_ = info.history
    clf.marglik_history_ = ml.history
    if not info.converged:
        why = (
            f"max_iter={clf.max_iter} reached"
            if info.n_iter >= clf.max_iter
            else "the objective no longer decreases at this precision"
        )
        warnings.warn(
            f"MAP solve stopped after {info.n_iter} {clf.solver} iterations with "
            f"‖∇Ψ‖ = {info.grad_norm:.3g} > tol = {clf.tol:g} ({why})",
            RuntimeWarning,
            stacklevel=3,
        )


def fit_vi(
    clf: Classifier, b: Backend, x: Tensor, callback: Callable[[dict], None] | None
) -> None:
    """VI at the fitted λ: mean-field on all p weights or a Gaussian on the top-``vi_rank``
    subspace of J(X), initialised at the Laplace fit (``vi_init``)."""
    lam = clf.prior_precision_
    opts = {"num_samples": clf.vi_samples, "max_iter": clf.vi_max_iter, "seed": clf.seed}
    if clf.vi_family == "meanfield":
        mu0 = clf.lin.theta.to(F64)
        if clf.prior_mean == "zero":
            mu0 = torch.zeros_like(mu0)
        jac: list = []  # J(x), formed once when it fits the budget
        if clf.vi_init == "laplace":
            m = b.weights()
            s = _mf.diagonal_laplace_scale(clf.lin, x, clf._y, clf.likelihood_, m, lam, jac)
        else:
            m, s = mu0.clone(), torch.full_like(mu0, lam**-0.5)
        res = _mf.fit_meanfield(
            clf.lin, x, clf._y, clf.likelihood_, mu0, lam, m, s, callback=callback, cache=jac, **opts
        )
        clf.vi_rank_ = clf.lin.num_params
    else:
        Phi, u_map = b.subspace(clf.vi_rank)
        m0 = b.m0 if isinstance(b, FunctionSpace) else prior_mean_function(clf.lin, x, b.mu0_arg)
        mu_init = C_init = None
        if clf.vi_init == "laplace":
            mu_init, C_init = _vi.laplace_init(clf.likelihood_, clf._y, m0, Phi, lam, u_map)
        res = _vi.fit_vi(
            clf.likelihood_, clf._y, m0, Phi, lam, mu_init, C_init, callback=callback, **opts
        )
        clf.vi_rank_ = int(Phi.shape[2])
    clf._vi = res
    clf.elbo_history_, clf.elbo_ = res.elbo_history, res.elbo
    clf.vi_converged_ = res.converged
