"""No silent failure (issue 15): every realistic mistake is refused clearly or handled right.

Two tables: REFUSED (id, call, exception type, message fragment) — each call must raise that type
(never a bare RuntimeError) naming what was wrong; HANDLED (id, call, check) — each call must
succeed and give the right numbers. Then: transactional fits per stage (fresh and already-fitted
objects), concurrent predictions, cost guards on a huge problem without running it, the CLI.
"""

from __future__ import annotations

import io
import math
import threading
import warnings

import pytest
import torch
from torch import nn

import fntk
from fntk import cli, persist
from fntk.experiments import common

from models import tanh_mlp

F64 = torch.float64
g = torch.Generator().manual_seed(11)
X = torch.randn(12, 3, dtype=F64, generator=g)
XT = torch.randn(5, 3, dtype=F64, generator=g)
Y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(12, dtype=F64, generator=g)
LABELS = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(k: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tanh_mlp(d_in=3, width=8, k=k).to(F64)


def reg(**kw) -> fntk.NTKRegressor:
    return fntk.NTKRegressor(mlp(), **kw)


def clf(**kw) -> fntk.LinearizedClassifier:
    return fntk.LinearizedClassifier(mlp(3), prior_precision=1.0, **kw)


def fitted_reg(**kw) -> fntk.NTKRegressor:
    return reg(optimize=False, **kw).fit(X, Y)


def fitted_clf(**kw) -> fntk.LinearizedClassifier:
    return clf(**kw).fit(X, LABELS)


def huge_net() -> nn.Module:
    """1,002,999 parameters (8 MB): the issue's "10⁶-parameter net"."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 1000), nn.Tanh(), nn.Linear(1000, 999), nn.Tanh(), nn.Linear(999, 1))


HUGE_X = torch.randn(10**6, 1, generator=torch.Generator().manual_seed(0))  # 10⁶ points


REFUSED = [
    # --- NTKRegressor: constructor and solver_options
    ("reg-lanczos-0", lambda: reg(solver_options={"lanczos_iterations": 0}), ValueError, "lanczos_iter"),
    ("reg-lanczos-5", lambda: reg(solver_options={"lanczos_iterations": 5}), ValueError, "an int ≥ 10"),
    ("reg-cg-tol-str", lambda: reg(solver_options={"cg_tolerance": "1e-6"}), TypeError, "cg_tolerance"),
    ("reg-cg-tol-big", lambda: reg(solver_options={"cg_tolerance": 2.0}), ValueError, "below 1"),
    ("reg-seed-none", lambda: reg(solver_options={"seed": None}), TypeError, "'seed'"),
    ("reg-seed-negative", lambda: reg(solver_options={"seed": -1}), ValueError, "int ≥ 0"),
    ("reg-probes-0", lambda: reg(solver_options={"num_probes": 0}), ValueError, "num_probes"),
    ("reg-cg-iter-float", lambda: reg(solver_options={"max_cg_iterations": 1.5}), TypeError, "max_cg"),
    ("reg-options-str", lambda: reg(solver_options="fast"), TypeError, "solver_options must be a dict"),
    ("reg-memory-4gb", lambda: reg(memory_limit="4GB"), TypeError, "4 * 1024**3"),
    ("reg-memory-0", lambda: reg(memory_limit=0), ValueError, "memory_limit"),
    ("reg-time-negative", lambda: reg(time_limit=-1.0), ValueError, "time_limit"),
    ("reg-time-str", lambda: reg(time_limit="1h"), TypeError, "time_limit"),
    ("reg-progress-str", lambda: reg(progress="yes"), TypeError, "progress must be True or False"),
    ("reg-noise-str", lambda: reg(noise="0.1"), TypeError, "noise"),
    ("reg-noise-nan", lambda: reg(noise=math.nan), ValueError, "noise"),
    ("reg-scale-inf", lambda: reg(scale=math.inf), ValueError, "scale"),
    ("reg-constant-nan", lambda: reg(constant=math.nan), ValueError, "constant"),
    ("reg-optimize-int", lambda: reg(optimize=1), TypeError, "optimize"),
    ("reg-optimize-str", lambda: reg(optimize="lengthscale"), ValueError, "['lengthscale']"),
    ("reg-output-bool", lambda: reg(output=True), TypeError, "output"),
    ("reg-model-str", lambda: fntk.NTKRegressor("net"), TypeError, "nn.Module"),
    # --- NTKRegressor: data
    ("reg-y-bool", lambda: reg().fit(X, Y > 0), TypeError, "real-valued"),
    ("reg-y-complex", lambda: reg().fit(X, Y.to(torch.complex128)), TypeError, "y.real"),
    ("reg-y-1e200", lambda: reg(mean="constant").fit(X, Y * 1e200), ValueError, "rescale y"),
    ("reg-y-1e-160", lambda: reg(mean="constant").fit(X, Y * 1e-160), ValueError, "outside [1e-152"),
    # --- NTKRegressor: cost guards
    ("reg-direct-memory", lambda: reg(solver="direct", memory_limit=100).fit(X, Y), fntk.NTKMemoryError,
     "memory_limit"),
    ("reg-time-limit", lambda: reg(time_limit=1e-9).fit(X, Y), fntk.TimeLimitError, "time_limit=None"),
    ("reg-huge-plan", lambda: fntk.NTKRegressor(huge_net()).fit(HUGE_X, HUGE_X[:, 0]), fntk.TimeLimitError,
     "days"),
    ("reg-covariance-memory",
     lambda: fitted_reg(memory_limit=10_000).predict(torch.randn(100, 3, dtype=F64)).covariance_matrix,
     fntk.NTKMemoryError, "post.variance"),
    # --- the posterior
    ("post-samples-0", lambda: fitted_reg().predict(XT).sample(0), ValueError, "num_samples"),
    ("post-samples-bool", lambda: fitted_reg().predict(XT).sample(True), TypeError, "num_samples"),
    ("post-generator", lambda: fitted_reg().predict(XT).sample(2, generator=0), TypeError, "torch.Generator"),
    ("post-num-std", lambda: fitted_reg().predict(XT).confidence_region("2"), TypeError, "num_std"),
    # --- LinearizedClassifier
    ("clf-seed-none", lambda: clf(seed=None), TypeError, "seed"),
    ("clf-seed-negative", lambda: clf(seed=-3), ValueError, "seed"),
    ("clf-tol-str", lambda: clf(tol="small"), TypeError, "tol"),
    ("clf-tol-nan", lambda: clf(tol=math.nan), ValueError, "tol"),
    ("clf-memory-4gb", lambda: clf(memory_budget="4GB"), TypeError, "memory_budget"),
    ("clf-memory-with-lin", lambda: fntk.LinearizedClassifier(fntk.Linearized(mlp(3)), memory_budget=2**20),
     ValueError, "fntk.Linearized(model, memory_budget=...)"),
    ("clf-time-0", lambda: clf(time_limit=0), ValueError, "time_limit"),
    ("clf-progress-int", lambda: clf(progress=1), TypeError, "progress"),
    ("clf-vi-rank-0", lambda: clf(vi_rank=0), ValueError, "vi_rank"),
    ("clf-chunk-0", lambda: fitted_clf().predict_f(XT, chunk=0), ValueError, "chunk"),
    ("clf-chunk-float", lambda: fitted_clf().predict_f(XT, chunk=2.5), TypeError, "chunk"),
    ("clf-function-memory", lambda: clf(space="function", memory_budget=1000).fit(X, LABELS),
     fntk.NTKMemoryError, "space='weight'"),
    ("clf-dense-memory", lambda: clf(space="weight", covariance="dense", memory_budget=1000).fit(X, LABELS),
     fntk.NTKMemoryError, "covariance='lowrank'"),
    ("clf-time-limit", lambda: clf(time_limit=1e-9).fit(X, LABELS), fntk.TimeLimitError, "time_limit"),
    ("clf-huge-plan", lambda: fntk.LinearizedClassifier(huge_net(), prior_precision=1.0).fit(
        HUGE_X, (HUGE_X[:, 0] > 0).long()), fntk.TimeLimitError, "days"),
    # --- saving
    ("save-open-file", lambda: fitted_reg().save(io.BytesIO()), TypeError, "not an open file"),
    ("save-bytes-path", lambda: fitted_reg().save(b"/tmp/x.fntk"), TypeError, "str or os.PathLike"),
    ("save-missing-folder", lambda: fitted_reg().save("/nonexistent/folder/reg.fntk"), FileNotFoundError,
     "does not exist"),
    ("save-into-folder", lambda: fitted_clf().save("/tmp"), IsADirectoryError, "is a folder"),
]


def _same(a, b):
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _int_y(dtype):
    yi = torch.tensor([3, -1, 0, 2, 5, 1, 1, 4, 0, 2, 3, 1]).to(dtype)
    got = reg(mean="constant").fit(X, yi).predict(XT).mean
    return got, reg(mean="constant").fit(X, yi.double()).predict(XT).mean


def _constant_y():
    return reg(mean="constant").fit(X, torch.full((12,), 7.5, dtype=F64)).predict(XT)


def _chunked_regression(space):
    kw = dict(space=space, optimize=False, noise=0.05)
    xt = torch.randn(400, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    small = fntk.NTKRegressor(fntk.Linearized(mlp(), memory_budget=20_000), **kw).fit(X, Y)
    assert small._state.point_bytes() * 400 > 3 * 20_000  # at least 3 chunks
    return small.predict(xt), reg(**kw).fit(X, Y).predict(xt)


def _chunked_classifier():
    xt = torch.randn(50, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    small = fntk.LinearizedClassifier(mlp(3), prior_precision=1.0, space="weight", covariance="dense",
                                      memory_budget=180_000).fit(X, LABELS)  # J rows of 19 points
    return small.predict_f(xt), fitted_clf(space="weight", covariance="dense").predict_f(xt)


def _few_lanczos():
    x = torch.randn(150, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(150, dtype=F64, generator=torch.Generator().manual_seed(1))
    net = tanh_mlp(d_in=3, width=16).to(F64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fntk.NTKRegressor(net, solver="iterative", space="function",
                          solver_options={"lanczos_iterations": 10}).fit(x, y)
    return [str(m.message) for m in w if issubclass(m.category, fntk.NumericalWarning)]


HANDLED = [
    # every integer dtype of y gives exactly the float64 result (int8 used to be refused)
    *[(f"reg-y-{dt}", lambda dt=dt: _int_y(dt), lambda r: _same(*r))
      for dt in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)],
    # constant targets (zero spread: standardised by their size, not divided by 0): that constant
    ("reg-y-constant", _constant_y,
     lambda post: torch.allclose(post.mean, torch.full_like(post.mean, 7.5), rtol=1e-12, atol=0)
     and bool(torch.isfinite(post.variance).all())),
    # a tiny memory budget chunks the predictions: the same numbers
    *[(f"reg-chunked-{sp}", lambda sp=sp: _chunked_regression(sp),
       lambda r: torch.allclose(r[0].mean, r[1].mean, rtol=1e-12, atol=0)
       and torch.allclose(r[0].variance, r[1].variance, rtol=1e-10, atol=1e-14))
      for sp in ("function", "weight")],
    ("clf-chunked-dense", _chunked_classifier,
     lambda r: torch.allclose(r[0][0], r[1][0], rtol=1e-12, atol=1e-14)
     and torch.allclose(r[0][1], r[1][1], rtol=1e-10, atol=1e-14)),
    # too few Lanczos steps for the spectrum: the fit warns, naming the option
    ("reg-lanczos-too-few", _few_lanczos, lambda msgs: any("lanczos_iterations" in m for m in msgs)),
    # progress bars on: same results
    ("reg-progress", lambda: (reg(progress=True).fit(X, Y).predict(XT).mean,
                              reg().fit(X, Y).predict(XT).mean), lambda r: _same(*r)),
    ("clf-progress", lambda: (clf(progress=True).fit(X, LABELS).predict_proba(XT),
                              clf().fit(X, LABELS).predict_proba(XT)), lambda r: _same(*r)),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(case):
    _, call, etype, fragment = case
    with pytest.raises(Exception) as info:
        call()
    err = info.value
    assert type(err) is not RuntimeError, f"bare RuntimeError: {err}"
    assert isinstance(err, etype), f"expected {etype.__name__}, got {type(err).__name__}: {err}"
    assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"


@pytest.mark.parametrize("case", HANDLED, ids=[c[0] for c in HANDLED])
def test_handled(case):
    _, call, check = case
    assert check(call())


def test_tables_are_large_and_distinct():
    assert len(REFUSED) + len(HANDLED) >= 40
    ids = [c[0] for c in REFUSED + HANDLED]
    assert len(set(ids)) == len(ids)


# ------------------------------------------------------------------------------ transactional fits
class Stop:
    """A callback raising KeyboardInterrupt at the first report of ``stage`` once ``after`` MAP
    reports have been seen (``after`` > one MAP solve's reports: inside the evidence search)."""

    def __init__(self, stage: str, after: int = 0):
        self.stage, self.after, self.maps = stage, after, 0

    def __call__(self, info: dict) -> None:
        self.maps += info.get("stage") == "map"
        if info.get("stage", "hyper") == self.stage and self.maps >= self.after:
            raise KeyboardInterrupt


def _snapshot(obj) -> dict:
    return dict(vars(obj))


def _assert_restored(obj, before: dict) -> None:
    now = vars(obj)
    assert set(now) == set(before), set(now) ^ set(before)
    assert all(now[k] is before[k] for k in before), [k for k in before if now[k] is not before[k]]


X2 = torch.randn(15, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
LABELS2 = (X2[:, 2] > 0).long() * 2


@pytest.mark.parametrize("fitted", [False, True], ids=["fresh", "fitted"])
@pytest.mark.parametrize(
    "kw, stop",
    [
        (dict(inference="laplace"), Stop("map", 2)),
        (dict(inference="laplace", prior_precision="marglik"), Stop("map", 25)),  # evidence stage
        (dict(inference="vi", vi_max_iter=10, vi_rank=4, vi_samples=4), Stop("vi")),
        (dict(inference="vi", vi_family="meanfield", vi_max_iter=10, vi_samples=4), Stop("vi")),
        (dict(inference="map", space="weight", solver="lbfgs"), Stop("map", 3)),
    ],
    ids=["map", "evidence", "vi-subspace", "vi-meanfield", "lbfgs"],
)
def test_interrupted_classifier_fit_changes_nothing(kw, stop, fitted):
    kw = {"prior_precision": 1.0, **kw}
    c = fntk.LinearizedClassifier(mlp(3), **kw)
    if fitted:
        c.fit(X, LABELS)
        proba = c.predict_proba(XT)
    before = _snapshot(c)
    with pytest.raises(KeyboardInterrupt):
        c.fit(X2, LABELS2, callback=stop)
    _assert_restored(c, before)
    if fitted:
        assert torch.equal(c.predict_proba(XT), proba)
    else:
        with pytest.raises(fntk.NotFittedError):
            c.predict(XT)
    assert torch.equal(c.fit(X2, LABELS2).predict_proba(XT),
                       fntk.LinearizedClassifier(mlp(3), **kw).fit(X2, LABELS2).predict_proba(XT))


@pytest.mark.parametrize("fitted", [False, True], ids=["fresh", "fitted"])
@pytest.mark.parametrize("solver", ["direct", "iterative"])
def test_interrupted_or_failed_regressor_fit_changes_nothing(solver, fitted):
    r = reg(solver=solver)
    if fitted:
        r.fit(X, Y)
        mean = r.predict(XT).mean
    before = _snapshot(r)
    with pytest.raises(KeyboardInterrupt):
        r.fit(X2, torch.cos(X2[:, 1]), callback=Stop("hyper"))
    _assert_restored(r, before)
    with pytest.raises(ValueError, match="rescale y"):  # fails after the plan: still nothing changes
        r.fit(X2, torch.cos(X2[:, 1]) * 1e300)
    _assert_restored(r, before)
    if fitted:
        assert torch.equal(r.predict(XT).mean, mean)
    else:
        with pytest.raises(fntk.NotFittedError):
            r.predict(XT)


# ---------------------------------------------------------------------------------------- threads
def test_concurrent_predictions_match_single_threaded():
    """8 threads predicting from one fitted regressor and one fitted classifier at once get exactly
    the single-threaded results (the estimators serialise calls on themselves)."""
    r = reg().fit(X, Y)
    c = fntk.LinearizedClassifier(mlp(3), inference="laplace").fit(X, LABELS)
    inputs = [torch.randn(7, 3, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    want = [(r.predict(a).mean, r.predict(a).variance, c.predict_proba(a)) for a in inputs]
    errors: list = []

    def work(i: int) -> None:
        try:
            for rep in range(4):
                j = (i + rep) % len(inputs)
                post = r.predict(inputs[j])
                got = (post.mean, post.variance, c.predict_proba(inputs[j]))
                if not all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(got, want[j])):
                    errors.append(f"thread {i}: wrong result for input {j}")
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(f"thread {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


# -------------------------------------------------------------------------------------------- CLI
def test_cli_refuses_a_file_as_out_before_training(tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    assert cli.main(["run", "sine", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not a folder" in err and "Traceback" not in err
    assert out.read_text() == "not a folder"  # nothing written, nothing trained
    assert cli.main(["run", "malaria", "--quick", "--out", str(tmp_path / "m"), "--data", str(out)]) == 2
    assert "--data" in capsys.readouterr().err  # a file given as the data folder


def test_corrupt_cache_entry_is_reported_removed_and_rebuilt(tmp_path, capsys):
    net = mlp()
    trained = mlp(seed=1)
    common.cached_state(tmp_path, "src", lambda: trained, net)  # written atomically
    path = tmp_path / "src.pt"
    path.write_bytes(path.read_bytes()[:100])  # a half-written entry
    built = []
    got = common.cached_state(tmp_path, "src", lambda: built.append(1) or trained, mlp())
    assert built == [1] and got is trained
    assert "src.pt is corrupt" in capsys.readouterr().err
    fresh = mlp(seed=2)  # the rebuilt entry is valid again: loaded, not retrained
    common.cached_state(tmp_path, "src", lambda: pytest.fail("retrained"), fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))
    persist.check_path(tmp_path / "x")  # the folder is usable
