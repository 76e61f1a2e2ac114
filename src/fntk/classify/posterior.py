"""The posterior of the logits at test points for each inference of a fitted
:class:`~fntk.classify.LinearizedClassifier`: per point (mean (m, k), covariances (m, k, k)) and
joint over the points (mean (m, k), covariance (m·k × m·k), point-major), float64.

MAP: no covariance. Laplace: J(x) Σ J(x)ᵀ from the backend. VI: the variational posterior pushed
through the (linear) logits, mean-field or subspace.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fntk.classify import cost
from fntk.classify import meanfield as _mf
from fntk.classify import vi as _vi
from fntk.classify.fitting import Backend

#: a LinearizedClassifier (this module is imported by it, so not imported here)
Classifier = Any


def logits_block(clf: Classifier, b: Backend, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Mean (m, k) and per-point covariances (m, k, k) (None for MAP) at checked x, float64."""
    if clf.inference == "vi" and clf.vi_family == "meanfield":
        return _mf.predictive_meanfield(clf.lin, x, clf._vi.mean, clf._vi.scale)
    if clf.inference == "vi":
        m0s, Phis, Kss = b.subspace_test(x)
        return _vi.predictive(m0s, Phis, Kss, clf._vi.mean, clf._vi.scale, clf.prior_precision_)
    return b.predict(x, covariance=clf.inference == "laplace", chunk=x.shape[0])


def logits_joint(clf: Classifier, b: Backend, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Mean (m, k) and joint covariance (m·k × m·k) in float64 at checked x (None for MAP)."""
    m = x.shape[0]
    if clf.inference == "map":
        return b.predict(x, covariance=False, chunk=max(m, 1))[0], None
    cost.check_joint(clf.lin, b, m)
    if clf.inference == "laplace":
        return b.predict_joint(x)
    if clf.vi_family == "meanfield":
        return _mf.predictive_meanfield(clf.lin, x, clf._vi.mean, clf._vi.scale, joint=True)
    m0s, Phis, Kss = b.subspace_test(x, joint=True)  # Kss: the whole K(x, x) (m·k × m·k)
    mean, cov = _vi.predictive(m0s.reshape(1, -1), Phis.reshape(1, -1, Phis.shape[2]), Kss[None],
                               clf._vi.mean, clf._vi.scale, clf.prior_precision_)
    return mean.reshape(m, -1), 0.5 * (cov[0] + cov[0].T)
