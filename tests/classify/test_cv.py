"""prior_precision="cv": stratified folds, the held-out NLL curve against a dense float64 reference
(explicit Jacobians, its own Newton and Laplace algebra per fold), the refit at the chosen λ, refusals."""

import math

import pytest
import torch

import fntk
from fntk.classify import LinearizedClassifier
from fntk.classify.cv import DEFAULT_GRID, stratified_folds

from classify_reference import DenseReference
from models import tanh_mlp

DT = torch.float64
GRID = (0.1, 1.0, 10.0, 100.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def problem(n=36, k=3, seed=0):
    torch.manual_seed(seed)
    model = tanh_mlp(d_in=2, width=6, k=k).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 2, dtype=DT, generator=g)
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    return model, x, y


def reference_curve(model, x, y, folds, inference):
    """CV(λ) = mean held-out −log p(y | x) with the dense reference fitted on each training fold."""
    n, curve = x.shape[0], []
    for lam in GRID:
        total = 0.0
        for va in folds:
            tr = torch.tensor([i for i in range(n) if i not in set(va.tolist())])
            ref = DenseReference(model, x[tr], y[tr], lam)
            mean, cov = ref.predictive(x[va])
            if inference == "laplace":  # probit: softmax(μ_c / √(1 + π/8 Σ_cc))
                mean = mean / torch.sqrt(1 + math.pi / 8 * cov.diagonal(dim1=-2, dim2=-1))
            total -= float(torch.log_softmax(mean, -1).gather(1, y[va][:, None]).sum())
        curve.append(total / n)
    return curve


def test_stratified_folds_are_balanced_and_cover_every_point():
    y = torch.tensor([0] * 7 + [1] * 5 + [2] * 9)
    folds = stratified_folds(y, 3, seed=4)
    assert torch.equal(torch.sort(torch.cat(folds)).values, torch.arange(21))
    for c, n_c in ((0, 7), (1, 5), (2, 9)):
        per_fold = [int((y[f] == c).sum()) for f in folds]
        assert sum(per_fold) == n_c and max(per_fold) - min(per_fold) <= 1
    assert [torch.equal(a, b) for a, b in zip(folds, stratified_folds(y, 3, seed=4))] == [True] * 3
    with pytest.raises(ValueError, match=r"cv_folds=6 needs at least 6 labels per class, but class 1 has"):
        stratified_folds(y, 6, seed=0)


@pytest.mark.parametrize("inference", ["map", "laplace"])
@pytest.mark.parametrize("space", ["function", "weight"])
def test_cv_curve_matches_the_dense_reference(inference, space):
    model, x, y = problem()
    clf = LinearizedClassifier(model, inference=inference, prior_precision="cv", cv_folds=3, cv_grid=GRID,
                               space=space, tol=1e-10).fit(x, y)
    ref = reference_curve(model, x, y, stratified_folds(y, 3, seed=0), inference)
    lams, got = zip(*clf.cv_history_)
    assert lams == GRID
    assert got == pytest.approx(ref, rel=1e-7)
    best = min(range(len(GRID)), key=lambda i: (ref[i], -GRID[i]))
    assert clf.prior_precision_ == GRID[best]
    # the final fit is a plain fit on all labels at the chosen λ
    plain = LinearizedClassifier(model, inference=inference, prior_precision=GRID[best], space=space,
                                 tol=1e-10).fit(x, y)
    torch.testing.assert_close(clf.predict_proba(x), plain.predict_proba(x), rtol=0, atol=1e-12)


def test_vi_cv_scores_vi_fold_fits():
    model, x, y = problem(n=30)
    kw = dict(inference="vi", vi_rank=8, vi_samples=8, vi_max_iter=15, num_samples=32, seed=2)
    clf = LinearizedClassifier(model, prior_precision="cv", cv_folds=3, cv_grid=(1.0, 30.0), **kw).fit(x, y)
    folds = stratified_folds(y, 3, seed=2)
    for lam, score in clf.cv_history_:
        total = 0.0
        for va in folds:
            tr = torch.tensor([i for i in range(30) if i not in set(va.tolist())])
            fold = LinearizedClassifier(model, prior_precision=lam, **kw).fit(x[tr], y[tr])
            probs = fold.predict_proba(x[va])
            total -= float(probs.double().gather(1, y[va][:, None]).log().sum())
        assert score == pytest.approx(total / 30, rel=1e-9)
    plain = LinearizedClassifier(model, prior_precision=clf.prior_precision_, **kw).fit(x, y)
    assert torch.equal(clf.predict_proba(x), plain.predict_proba(x))


def test_cv_refusals_and_defaults():
    model, x, y = problem(n=12)  # 4 labels per class
    with pytest.raises(ValueError, match=r"needs at least 5 labels per class, but class \d has only 4"):
        LinearizedClassifier(model, prior_precision="cv").fit(x, y)
    with pytest.raises(ValueError, match="prior_precision must be 'marglik', 'cv' or a positive float"):
        LinearizedClassifier(model, prior_precision="loo")
    with pytest.raises(ValueError, match="cv_folds"):
        LinearizedClassifier(model, prior_precision="cv", cv_folds=1)
    with pytest.raises(ValueError, match="cv_grid must hold positive finite values"):
        LinearizedClassifier(model, prior_precision="cv", cv_grid=[1.0, -2.0])
    with pytest.raises(TypeError, match="cv_grid must be a sequence"):
        LinearizedClassifier(model, prior_precision="cv", cv_grid="1,2")
    one = LinearizedClassifier(model, prior_precision=1.0).fit(x, y).estimated_seconds_
    with pytest.raises(fntk.TimeLimitError, match="3-fold CV over 15"):  # 46 fits, 3 allowed
        LinearizedClassifier(model, prior_precision="cv", cv_folds=3, time_limit=3 * one).fit(x, y)
    clf = LinearizedClassifier(model, prior_precision="cv", cv_folds=4)
    assert clf.cv_grid == DEFAULT_GRID and len(DEFAULT_GRID) == 15
    assert DEFAULT_GRID[0] == pytest.approx(1e-2) and DEFAULT_GRID[-1] == pytest.approx(1e5)
    clf.fit(x, y)
    assert clf.prior_precision_ in DEFAULT_GRID and len(clf.cv_history_) == 15
