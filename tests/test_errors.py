"""Bad input is refused early, with an error naming the argument, what was expected and what came.

One table: (id, callable, expected exception type, message fragment). Every case must raise the
expected type (never a bare torch RuntimeError) with the fragment in its message.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fntk
from fntk import cli, persist
from fntk.likelihoods import Categorical, Gaussian

from models import tanh_mlp

F64 = torch.float64


def _mlp(k: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return tanh_mlp(d_in=3, width=8, k=k).to(F64)


class TupleOut(nn.Module):
    """A model whose forward returns a tuple (not a tensor)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2).to(F64)

    def forward(self, x):
        return self.fc(x), x


X = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
Y = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(2))
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def lin(k: int = 1) -> fntk.Linearized:
    m = fntk.Linearized(_mlp(k))
    m.forward(X)
    return m


def nan_at(t: torch.Tensor, i: int, value: float = math.nan) -> torch.Tensor:
    t = t.clone()
    t.view(t.shape[0], -1)[i, 0] = value
    return t


def fitted_reg() -> fntk.NTKRegressor:
    return fntk.NTKRegressor(_mlp(), optimize=False).fit(X, Y)


CASES = [
    # --- Linearized construction and calls
    ("lin-not-module", lambda: fntk.Linearized(lambda x: x), TypeError, "nn.Module"),
    ("lin-empty-selection", lambda: fntk.Linearized(_mlp(), params=[]), ValueError, "selection is empty"),
    ("lin-unknown-param", lambda: fntk.Linearized(_mlp(), params=["nope.weight"]), ValueError, "nope.weight"),
    ("lin-param-string", lambda: fntk.Linearized(_mlp(), params="0.weight"), TypeError, "single string"),
    ("lin-predicate-none", lambda: fntk.Linearized(_mlp(), params=lambda n, p: False), ValueError, "empty"),
    ("lin-budget", lambda: fntk.Linearized(_mlp(), memory_budget=-1), ValueError, "memory_budget"),
    ("lin-x-not-tensor", lambda: lin().forward([[1.0, 2.0, 3.0]]), TypeError, "x must be a torch.Tensor"),
    ("lin-x-scalar", lambda: fntk.Linearized(_mlp()).forward(torch.tensor(1.0)), ValueError, "scalar"),
    ("lin-x-empty", lambda: lin().forward(torch.zeros(0, 3, dtype=F64)), ValueError, "empty"),
    (
        "lin-x-int",
        lambda: fntk.Linearized(_mlp()).forward(torch.ones(4, 3, dtype=torch.long)),
        TypeError,
        "int64",
    ),
    (
        "lin-x-bad-features",
        lambda: fntk.Linearized(_mlp()).forward(torch.ones(4, 5, dtype=F64)),
        ValueError,
        "(4, 5)",
    ),
    (
        "lin-x-changed-features",
        lambda: lin().forward(torch.ones(4, 4, dtype=F64)),
        ValueError,
        "feature shape",
    ),
    ("lin-x-nan", lambda: lin().forward(nan_at(X, 3)), ValueError, "index 3"),
    ("lin-x-inf", lambda: lin().forward(nan_at(X, 2, math.inf)), ValueError, "index 2"),
    ("lin-tuple-output", lambda: fntk.Linearized(TupleOut()).forward(X), TypeError, "must be a Tensor"),
    ("lin-jvp-v-shape", lambda: lin().jvp(X, torch.ones(5, dtype=F64)), ValueError, "must have shape"),
    (
        "lin-jvp-v-int",
        lambda: (lambda m: m.jvp(X, torch.ones(m.num_params, dtype=torch.long)))(lin()),
        TypeError,
        "floating point",
    ),
    ("lin-vjp-u-shape", lambda: lin().vjp(X, torch.ones(5, 2, dtype=F64)), ValueError, "must have shape"),
    ("lin-call-w-shape", lambda: lin()(X, torch.ones(3, dtype=F64)), ValueError, "must have shape"),
    # --- fntk.ntk
    ("ntk-method", lambda: fntk.ntk(lin(), X, method="magic"), ValueError, "structured"),
    ("ntk-outputs", lambda: fntk.ntk(lin(2), X, outputs="diagonal"), ValueError, "independent"),
    ("ntk-output-range", lambda: fntk.ntk(lin(2), X, outputs=5), ValueError, "5"),
    ("ntk-not-lin", lambda: fntk.ntk(_mlp(), X), TypeError, "Linearized"),
    ("ntk-x2-features", lambda: fntk.ntk(lin(), X, torch.ones(2, 4, dtype=F64)), ValueError, "x2"),
    ("ntk-x1-nan", lambda: fntk.ntk(lin(), nan_at(X, 4)), ValueError, "index 4"),
    # --- operators
    ("ntkop-not-lin", lambda: fntk.NTKOperator(_mlp(), X), TypeError, "Linearized"),
    ("ntkop-dense-flag", lambda: fntk.NTKOperator(lin(), X, dense="yes"), ValueError, "dense"),
    (
        "jacop-x-empty",
        lambda: fntk.JacobianOperator(lin(), torch.zeros(0, 3, dtype=F64)),
        ValueError,
        "empty",
    ),
    ("ggn-method", lambda: fntk.GGNOperator(lin(), X, Gaussian(), method="fisher"), ValueError, "exact"),
    ("ggn-likelihood", lambda: fntk.GGNOperator(lin(), X, "gausian"), ValueError, "gaussian"),
    ("ggn-likelihood-type", lambda: fntk.GGNOperator(lin(), X, 3), TypeError, "likelihood"),
    ("ggn-y-length", lambda: fntk.GGNOperator(lin(3), X, Categorical(), y=LABELS[:4]), ValueError, "6"),
    # --- NTKRegressor
    ("reg-space", lambda: fntk.NTKRegressor(_mlp(), space="hilbert"), ValueError, "weight"),
    ("reg-solver", lambda: fntk.NTKRegressor(_mlp(), solver="qr"), ValueError, "iterative"),
    ("reg-noise", lambda: fntk.NTKRegressor(_mlp(), noise=-1.0), ValueError, "noise"),
    (
        "reg-optimize-name",
        lambda: fntk.NTKRegressor(_mlp(), optimize=("lengthscale",)),
        ValueError,
        "lengthscale",
    ),
    ("reg-y-length", lambda: fntk.NTKRegressor(_mlp()).fit(X, Y[:4]), ValueError, "n=6"),
    (
        "reg-y-extra-axis",
        lambda: fntk.NTKRegressor(_mlp()).fit(X, torch.ones(6, 2, dtype=F64)),
        ValueError,
        "(6, 2)",
    ),
    ("reg-y-nan", lambda: fntk.NTKRegressor(_mlp()).fit(X, nan_at(Y, 5)), ValueError, "index 5"),
    ("reg-x-inf", lambda: fntk.NTKRegressor(_mlp()).fit(nan_at(X, 1, -math.inf), Y), ValueError, "index 1"),
    ("reg-x-empty", lambda: fntk.NTKRegressor(_mlp()).fit(X[:0], Y[:0]), ValueError, "empty"),
    ("reg-predict-unfitted", lambda: fntk.NTKRegressor(_mlp()).predict(X), ValueError, "not fitted"),
    (
        "reg-predict-features",
        lambda: fitted_reg().predict(torch.ones(2, 7, dtype=F64)),
        ValueError,
        "feature shape",
    ),
    ("reg-output-range", lambda: fntk.NTKRegressor(_mlp(), output=3).fit(X, Y), ValueError, "out of range"),
    (
        "reg-save-unfitted",
        lambda: persist.save(fntk.NTKRegressor(_mlp()), "/nonexistent/x"),
        ValueError,
        "not fitted",
    ),
    ("reg-callback", lambda: fntk.NTKRegressor(_mlp()).fit(X, Y, callback="print"), TypeError, "callback"),
    # --- LinearizedClassifier
    ("clf-inference", lambda: fntk.LinearizedClassifier(_mlp(3), inference="mcmc"), ValueError, "laplace"),
    (
        "clf-prior",
        lambda: fntk.LinearizedClassifier(_mlp(3), prior_precision=-2.0),
        ValueError,
        "prior_precision",
    ),
    (
        "clf-float-labels",
        lambda: fntk.LinearizedClassifier(_mlp(3)).fit(X, LABELS.double()),
        TypeError,
        "integer",
    ),
    ("clf-label-range", lambda: fntk.LinearizedClassifier(_mlp(3)).fit(X, LABELS + 1), ValueError, "max 3"),
    (
        "clf-negative-label",
        lambda: fntk.LinearizedClassifier(_mlp(3)).fit(X, LABELS - 1),
        ValueError,
        "min -1",
    ),
    (
        "clf-label-length",
        lambda: fntk.LinearizedClassifier(_mlp(3)).fit(X, LABELS[:5]),
        ValueError,
        "5 labels",
    ),
    ("clf-label-axes", lambda: fntk.LinearizedClassifier(_mlp(3)).fit(X, LABELS[:, None]), ValueError, "1-d"),
    ("clf-predict-unfitted", lambda: fntk.LinearizedClassifier(_mlp(3)).predict(X), ValueError, "not fitted"),
    (
        "clf-callback",
        lambda: fntk.LinearizedClassifier(_mlp(3)).fit(X, LABELS, callback=3),
        TypeError,
        "callback",
    ),
    ("clf-not-model", lambda: fntk.LinearizedClassifier("resnet"), TypeError, "nn.Module"),
    # --- persistence
    (
        "load-missing",
        lambda: persist.load("/nonexistent/adapter.pt", _mlp()),
        FileNotFoundError,
        "adapter.pt",
    ),
    ("load-not-model", lambda: persist.load("/nonexistent/adapter.pt", "model"), TypeError, "nn.Module"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, call, etype, fragment = case
    with pytest.raises(Exception) as info:
        call()
    err = info.value
    assert type(err) is not RuntimeError, f"bare RuntimeError: {err}"
    assert isinstance(err, etype), f"expected {etype.__name__}, got {type(err).__name__}: {err}"
    assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"


def test_table_is_large_and_distinct():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "nonsense"], "invalid choice"),
        (["run", "sine", "--seed", "abc"], "invalid int"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_refuses_bad_arguments(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "usage: fntk" in err
