"""Every experiment runs end to end in --quick mode through the CLI, into a temporary folder.

Real-data experiments use the default data root (``$FNTK_DATA``, else the development checkout's
``../shared/data``) and are skipped, with the reason, when it is absent. Each checks that
results.json holds a finite number for every method and metric, and that the figures exist.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fntk import cli
from fntk.data.paths import default_root


def _results(out: Path) -> dict:
    path = out / "results.json"
    assert path.is_file(), f"no results.json in {out}"
    return json.loads(path.read_text())


def _check_summary(res: dict, metrics: tuple[str, ...], out: Path) -> None:
    """A finite mean of every metric for every method (and every grid point), and the figures."""
    seen = set()
    for row in res["summary"]:
        seen.add(row["method"] if "method" in row else None)
        for m in metrics:
            value = row[m]
            assert value is not None and math.isfinite(value), f"{m} not finite in {row}"
    if "method" in res["summary"][0]:
        assert seen == set(res["methods"]), f"methods without results: {set(res['methods']) - seen}"
    for fig in res["figures"]:
        assert Path(fig).is_file() and Path(fig).parent == out, fig


def _data_root() -> Path:
    root = default_root()
    if root is None or not root.is_dir():
        pytest.skip("no real data: set FNTK_DATA to a folder laid out like shared/data")
    return root


def _need(root: Path, relative: str) -> None:
    if not (root / relative).is_file():
        pytest.skip(f"real data file {root / relative} not found")


def test_demo_quick_sine(tmp_path):
    """`fntk demo --quick` runs the sine experiment; the NTK-GP beats the unadapted source net."""
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    res = _results(tmp_path)
    assert res["experiment"] == "sine" and res["config"]["quick"]
    _check_summary(res, ("mse", "nll", "coverage"), tmp_path)
    mse = {(r["setting"], r["method"]): r["mse"] for r in res["summary"]}
    for setting in ("sine", "linear"):
        assert mse[(setting, "ntk_gp")] < mse[(setting, "source")], setting
    # function and weight space are the same exact GP: same marginal likelihood and predictions
    agree = res["space_agreement"]
    assert agree["lml"] < 1e-6 and agree["mse"] < 1e-6, agree


def test_linearity_quick(tmp_path):
    assert cli.main(["run", "linearity", "--quick", "--out", str(tmp_path)]) == 0
    res = _results(tmp_path)
    _check_summary(res, ("taylor", "gd_linear", "ntk_gp", "mse_network"), tmp_path)
    untrained = sorted((r for r in res["summary"] if r["state"] == "untrained"), key=lambda r: r["width"])
    # the linearized model's gradient descent tracks the network better as the width grows
    assert untrained[-1]["gd_linear"] < untrained[0]["gd_linear"]


def test_malaria_quick(tmp_path):
    root = _data_root()
    _need(root, "map_kenya_pf/kenya_pf_2000_2020.npz")
    assert cli.main(["run", "malaria", "--quick", "--out", str(tmp_path), "--data", str(root)]) == 0
    _check_summary(_results(tmp_path), ("mse", "nll", "coverage"), tmp_path)


def test_faces_quick(tmp_path):
    root = _data_root()
    _need(root, "orl_faces/orl_faces_112x92_uint8.npz")
    assert cli.main(["run", "faces", "--quick", "--out", str(tmp_path), "--data", str(root)]) == 0
    _check_summary(_results(tmp_path), ("rmse_deg", "nll", "coverage"), tmp_path)


def test_bench_quick_from_a_wheel(tmp_path):
    """``fntk bench --quick`` from a wheel installed into a fresh folder, run outside the checkout:
    the benchmark scripts travel with the package (fntk_bench), nothing reaches into the source."""
    root = Path(__file__).resolve().parents[2]
    wheels, site, work, out = (tmp_path / d for d in ("wheels", "site", "work", "out"))
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(root)], check=True)
    wheel = next(wheels.glob("fntk-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    code = (
        "import sys; import fntk, fntk_bench; from fntk.cli import main\n"
        "assert fntk.__file__.startswith(sys.argv[1]) and fntk_bench.__file__.startswith(sys.argv[1])\n"
        "sys.exit(main(['bench', '--quick', '--out', sys.argv[2]]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run([sys.executable, "-c", code, str(site), str(out)], cwd=work, env=env, check=True)
    res = _results(out)
    assert {r["study"] for r in res["records"]} == {"products", "ntk", "curvature", "gp"}
    for r in res["records"]:
        assert r["seconds"] is not None and math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert r["ratio"] is not None and math.isfinite(r["ratio"]) and r["ratio"] > 0, r


@pytest.mark.parametrize("experiment", ["malaria", "faces"])
def test_missing_data_is_one_line(experiment, tmp_path, monkeypatch, capsys):
    """A wrong --data path, or none at all, gives a one-line error naming the expected file."""
    missing = tmp_path / "nowhere"
    assert cli.main(["run", experiment, "--quick", "--out", str(tmp_path / "o"), "--data", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fntk: error:"), err
    assert str(missing) in err and ("map_kenya_pf" in err or "orl_faces" in err), err
    monkeypatch.delenv("FNTK_DATA", raising=False)
    assert cli.main(["run", experiment, "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FNTK_DATA" in err and "--data" in err, err
    assert not (tmp_path / "o" / "results.json").exists()
