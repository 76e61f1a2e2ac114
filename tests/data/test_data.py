"""fntk.data: synthetic tasks always; real-data loaders when the data root exists (else skipped)."""

from __future__ import annotations

import math

import pytest
import torch

from fntk.data import digits, faces, malaria, nets, paths, sine


def real_root(relative: str):
    """The data root holding ``relative``, or skip the test with the reason."""
    root = paths.default_root()
    if root is None or not (root / relative).is_file():
        pytest.skip(
            f"real data absent: set FNTK_DATA to a folder laid out like shared/data (needs {relative})"
        )
    return root


# ----------------------------------------------------------------------------- paths
def test_resolve_root_errors_without_root_or_env(monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="FNTK_DATA") as e:
        paths.resolve_root(None, expect="usps_esl_zip/usps_16x16_uint8.npz")
    msg = str(e.value)
    assert "\n" not in msg and "--data" in msg and "usps_esl_zip/usps_16x16_uint8.npz" in msg


def test_argument_beats_env(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_VAR, "/nonexistent/env/root")
    assert paths.resolve_root(tmp_path) == tmp_path
    assert paths.resolve_root() == paths.Path("/nonexistent/env/root")
    assert paths.default_root() == paths.Path("/nonexistent/env/root")


def test_missing_file_names_expected_path(tmp_path):
    for call, rel in [
        (lambda: digits.load_usps(tmp_path), digits.USPS_FILE),
        (lambda: digits.load_mnist5k(tmp_path), digits.MNIST5K_FILE),
        (lambda: malaria.load_malaria_year(2012, tmp_path), malaria.MALARIA_FILE),
        (lambda: faces.load_orl(tmp_path), faces.FACES_FILE),
        (lambda: nets.load_pretrained_lenet5(tmp_path), nets.LENET5_FILE),
    ]:
        with pytest.raises(FileNotFoundError) as e:
            call()
        msg = str(e.value)
        assert str(tmp_path / rel) in msg and "FNTK_DATA" in msg and "\n" not in msg


def test_corrupt_pretrained_file_is_refused_naming_it(tmp_path):
    path = tmp_path / nets.LENET5_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 half a zip")  # a truncated download
    with pytest.raises(ValueError, match="pretrained LeNet-5 file .*does not load") as e:
        nets.load_pretrained_lenet5(tmp_path)
    assert str(path) in str(e.value)
    torch.save({"weight": torch.zeros(2)}, path)  # another network's weights
    with pytest.raises(ValueError, match="does not load"):
        nets.load_pretrained_lenet5(tmp_path)


# ----------------------------------------------------------------------------- sine family
def test_sine_task_is_seeded_and_hand_checkable():
    a = sine.sample_task(10, seed=3)
    b = sine.sample_task(10, seed=3)
    c = sine.sample_task(10, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.params == b.params and a.params != c.params
    assert a.x_train.shape == (10, 1) and a.y_train.shape == (10,)
    assert torch.all(a.x_train[1:] >= a.x_train[:-1])  # sorted
    p = {"amplitude": 2.0, "phase": 0.5, "frequency": 1.5}
    t = sine.sample_task(4, seed=0, params=p, n_test=3, dtype=torch.float64)
    expect = torch.tensor(
        [2 * math.sin(-7.5 + 0.5), 2 * math.sin(0.5), 2 * math.sin(7.5 + 0.5)], dtype=torch.float64
    )
    assert torch.allclose(t.y_test, expect, atol=1e-12)
    assert t.noise_std == pytest.approx(0.02)


def test_sine_prior_ranges_and_noise_level():
    tasks = sine.sample_tasks(300, 1, seed=0, kind="sine")
    amps = torch.tensor([t.params["amplitude"] for t in tasks])
    phases = torch.tensor([t.params["phase"] for t in tasks])
    freqs = torch.tensor([t.params["frequency"] for t in tasks])
    assert 0.1 <= amps.min() and amps.max() <= 5.0 and amps.mean() == pytest.approx(2.55, abs=0.25)
    assert 0.0 <= phases.min() and phases.max() <= 2 * math.pi
    assert 0.5 <= freqs.min() and freqs.max() <= 2.0 and freqs.mean() == pytest.approx(1.25, abs=0.1)
    big = sine.sample_task(20000, seed=1, dtype=torch.float64)
    x = big.x_train.squeeze(1)
    assert -5.0 <= x.min() < -4.99 and 4.99 < x.max() <= 5.0
    resid = big.y_train - big.f(big.x_train)
    assert resid.std().item() == pytest.approx(0.01 * big.params["amplitude"], rel=0.03)
    lin = sine.sample_task(20000, seed=2, kind="linear", dtype=torch.float64)
    assert (lin.y_train - lin.f(lin.x_train)).std().item() == pytest.approx(0.3, rel=0.03)
    assert abs(lin.params["slope"]) <= 3 and abs(lin.params["intercept"]) <= 3


def test_transfer_tasks_linear_source():
    src, tgt = sine.transfer_tasks(5, n_source=50, n_target=10, seed=0, source_kind="linear", num_sources=2)
    assert [t.kind for t in src] == ["linear", "linear"] and all(t.kind == "sine" for t in tgt)
    assert len(tgt) == 5 and tgt[0].x_train.shape == (10, 1) and src[0].x_train.shape == (50, 1)
    x, y = sine.stack_tasks(src)
    assert x.shape == (100, 1) and torch.equal(y[:50], src[0].y_train)
    src2, tgt2 = sine.transfer_tasks(5, n_source=50, n_target=10, seed=0, source_kind="linear", num_sources=2)
    assert torch.equal(tgt2[4].y_train, tgt[4].y_train)


# ----------------------------------------------------------------------------- digits helpers
def test_to_mnist_format_places_digit_in_centred_20px_box():
    x = digits.to_mnist_format(torch.ones(2, 16, 16))
    assert x.shape == (2, 1, 28, 28)
    assert torch.allclose(x[:, :, 4:24, 4:24], torch.ones(()), atol=1e-6)
    assert x.sum().item() == pytest.approx(2 * 400.0, abs=1e-3)


def test_balanced_indices_counts_and_nesting():
    y = torch.arange(10).repeat(30)
    i50 = digits.balanced_indices(y, 50, seed=1)
    assert torch.bincount(y[i50], minlength=10).tolist() == [5] * 10
    assert len(set(i50.tolist())) == 50
    i13 = digits.balanced_indices(y, 13, seed=1)
    counts = torch.bincount(y[i13], minlength=10)
    assert counts.sum() == 13 and counts.min() == 1 and counts.max() == 2
    i10 = digits.balanced_indices(y, 10, seed=1)
    assert set(i10.tolist()) <= set(i50.tolist())
    assert torch.equal(i50, digits.balanced_indices(y, 50, seed=1))
    with pytest.raises(ValueError, match="class 0 has 30"):
        digits.balanced_indices(y, 310, seed=0)


def test_sklearn_digits_format_and_transfer_split():
    x, y = digits.load_sklearn_digits()
    assert x.shape == (1797, 1, 28, 28) and y.shape == (1797,)
    assert x.min() == 0.0 and x.max() == 1.0 and x[:, :, :4].abs().max() == 0.0
    d = digits.digits_transfer("sklearn", 50, seed=0)
    assert torch.bincount(d["y_train"], minlength=10).tolist() == [5] * 10
    assert d["x_test"].shape[0] == 1797 - 50


# ----------------------------------------------------------------------------- faces geometry
def test_rotation_matches_rot90_and_identity():
    x = torch.rand(3, 1, 64, 64)
    assert torch.allclose(faces.rotate(x, torch.full((3,), 90.0)), torch.rot90(x, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(faces.rotate(x, torch.full((3,), -90.0)), torch.rot90(x, -1, (-2, -1)), atol=1e-5)
    assert torch.allclose(faces.rotate(x, torch.zeros(3)), x, atol=1e-5)
    assert torch.equal(faces.centre_crop(x), x[..., 9:54, 9:54]) and faces.CROP == 45


def test_pixel_split_disjoint_and_nested():
    tr, te = malaria.train_test_pixels(1000, 50, 300, seed=2)
    tr2, te2 = malaria.train_test_pixels(1000, 100, 300, seed=2)
    assert not set(tr.tolist()) & set(te.tolist())
    assert torch.equal(te, te2) and torch.equal(tr, tr2[:50])
    with pytest.raises(ValueError):
        malaria.train_test_pixels(100, 60, 50, seed=0)


# ----------------------------------------------------------------------------- nets
def test_mlp_and_heteroscedastic_head():
    net = nets.mlp([1, 40, 40, 1], "tanh")
    assert sum(p.numel() for p in net.parameters()) == 80 + 1640 + 41
    assert isinstance(net[1], torch.nn.Tanh) and len(net) == 5
    het = nets.heteroscedastic_mlp((2, 500, 500))
    assert het(torch.zeros(3, 2)).shape == (3, 2)
    out = torch.tensor([[0.5, math.log(math.e - 1.0)]], dtype=torch.float64)  # softplus = 1
    mean, var = nets.heteroscedastic_mean_var(out)
    assert mean.item() == 0.5 and var.item() == pytest.approx(1.0 + 1e-6, abs=1e-12)
    nll = nets.heteroscedastic_nll(out, torch.tensor([2.5], dtype=torch.float64))
    v = 1.0 + 1e-6
    assert nll.item() == pytest.approx(0.5 * (math.log(2 * math.pi) + math.log(v) + 4.0 / v), abs=1e-12)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        nets.heteroscedastic_mean_var(torch.zeros(3, 3))
    assert nets.FacesCNN()(torch.zeros(2, 1, 45, 45)).shape == (2, 2)
    assert sum(p.numel() for p in nets.LeNet5().parameters()) == 648226


# ----------------------------------------------------------------------------- real data
def test_usps_real():
    root = real_root(digits.USPS_FILE)
    x, y = digits.load_usps(root, "train")
    assert x.shape == (7291, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.bincount(y).tolist() == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    xt, yt = digits.load_usps(root, "test")
    assert xt.shape[0] == 2007 and x[:, :, :4].abs().max() == 0.0
    d = digits.digits_transfer("usps", 100, seed=3, root=root, n_test=500)
    assert torch.bincount(d["y_train"]).tolist() == [10] * 10 and d["y_test"].shape == (500,)


def test_mnist5k_real():
    root = real_root(digits.MNIST5K_FILE)
    x, y = digits.load_mnist5k(root)
    assert x.shape == (5000, 1, 28, 28) and torch.bincount(y).tolist() == [500] * 10
    assert x.min() == 0.0 and x.max() == 1.0


def test_malaria_real():
    root = real_root(malaria.MALARIA_FILE)
    y12 = malaria.load_malaria_year(2012, root)
    y16 = malaria.load_malaria_year(2016, root)
    assert y12.x.shape == (25049, 2) and torch.equal(y12.x, y16.x)
    assert y12.x.min(0).values.tolist() == [0.0, 0.0] and y12.x.max(0).values.tolist() == [1.0, 1.0]
    # Kenya means from the data README: 0.035 (2012), 0.060 (2016).
    assert y12.y.mean().item() == pytest.approx(0.035, abs=0.0006)
    assert y16.y.mean().item() == pytest.approx(0.060, abs=0.0006)
    img = y16.to_grid(y16.y)
    assert img.shape == (235, 191) and int((~torch.from_numpy(img).isnan()).sum()) == 25049
    d = malaria.malaria_transfer(25, seed=1, root=root)
    assert (
        d["x_source"].shape == (2000, 2) and d["x_target"].shape == (25, 2) and d["y_test"].shape == (5000,)
    )
    assert torch.equal(d["y_test"], y16.y[d["test_idx"]])


def test_faces_real():
    root = real_root(faces.FACES_FILE)
    f = faces.rotated_faces(root, n_rotations=2, seed=0)
    assert f.images.shape == (800, 1, 45, 45) and f.angles.shape == (800,)
    assert f.angles.abs().max() <= 90.0 and 0.0 < f.images.min() and f.images.max() <= 1.0
    assert torch.equal(f.subject[:400], f.subject[400:])
    d = faces.faces_transfer(0.25, seed=0, faces=f)
    src, tgt = set(d["source_subjects"].tolist()), set(d["target_subjects"].tolist())
    assert len(src) == len(tgt) == 20 and not src & tgt
    assert set(d["subject_test"].tolist()) <= tgt
    assert d["x_source"].shape[0] == 400 and d["x_target"].shape[0] == 100 and d["x_test"].shape[0] == 300
    assert d["y_source"].double().mean().item() == pytest.approx(0.0, abs=1e-6)
    assert d["y_source"].double().std().item() == pytest.approx(1.0, abs=1e-6)
