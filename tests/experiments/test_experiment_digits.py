"""`fntk run digits --quick` end to end through the CLI, with the real data from the default root."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fntk import cli
from fntk.data.paths import default_root
from fntk.experiments import digits

NEEDED = ("pretrained_mnist_lenet5/mnist_lenet5_clntrained.pt", "usps_esl_zip/usps_16x16_uint8.npz")


def _root() -> Path:
    root = default_root()
    if root is None or not root.is_dir():
        pytest.skip("no real data: set FNTK_DATA to a folder laid out like shared/data")
    for rel in NEEDED:
        if not (root / rel).is_file():
            pytest.skip(f"real data file {root / rel} not found")
    return root


def test_digits_quick(tmp_path):
    root = _root()
    assert cli.main(["run", "digits", "--quick", "--out", str(tmp_path), "--data", str(root)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["experiment"] == "digits" and res["config"]["quick"]
    assert res["methods"] == list(digits.QUICK["methods"])
    seen = set()
    for row in res["summary"]:
        seen.add((row["target"], row["method"]))
        for metric in ("accuracy", "nll", "ece", "brier"):
            assert row[metric] is not None and math.isfinite(row[metric]), (metric, row)
        assert 0 <= row["accuracy"] <= 1 and row["nll"] > 0
    assert seen == {(t, m) for t in digits.QUICK["targets"] for m in digits.QUICK["methods"]}
    for fig in res["figures"]:
        assert Path(fig).is_file() and Path(fig).parent == tmp_path
    for rec in res["records"]:  # the linearized fits converged
        if rec["method"].startswith(("map", "laplace")):
            assert rec["converged"] and rec["lambda"] > 0, rec


def test_digits_missing_data_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["run", "digits", "--quick", "--out", str(tmp_path / "o"), "--data", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fntk: error:") and "pretrained_mnist_lenet5" in err, err
    assert not (tmp_path / "o" / "results.json").exists()
