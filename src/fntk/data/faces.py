"""Rotated ORL ("Olivetti") faces: regress the rotation angle, transfer across people.

The paper's Olivetti experiment (amzn/xfer ``finite_ntk/experiments/olivetti``) takes scikit-learn's
64x64 Olivetti faces, rotates each face 30 times by angles drawn from U[-90°, 90°] (bilinear, black
background), crops the central ``int(√2·64/2) = 45`` pixels square (which always lies inside the
rotated face), and regresses the angle. Source: 20 people; target: the other 20.

scikit-learn's Olivetti set is a 64x64 crop/downscale of the ORL 112x92 images we have, so we
rebuild it: centre-crop 92x92 (rows 10..101), downscale to 64x64 (antialiased bilinear), scale to
[0, 1]; then rotate about the image centre in a 64x64 canvas and keep rows/columns 9..53 (the paper's
``crop_around_center``). Angles are standardised by the source set's mean and std (as the paper).

Images are (N, 1, 45, 45) float in [0, 1]; angles (N,) in degrees, positive = counter-clockwise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fntk.data.paths import data_file

FACES_FILE = "orl_faces/orl_faces_112x92_uint8.npz"
OLIVETTI_SIZE = 64
CROP = int(math.sqrt(2) * OLIVETTI_SIZE / 2)  # 45, as the paper's code


def load_orl(root: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The raw ORL faces: images uint8 (400, 112, 92), subject int64 (400,) in 0..39, image_index (400,)."""
    with np.load(data_file(FACES_FILE, root)) as d:
        return (
            torch.from_numpy(d["images"].copy()),
            torch.from_numpy(d["subject"].astype(np.int64)),
            torch.from_numpy(d["image_index"].astype(np.int64)),
        )


def olivetti_like(images: Tensor, size: int = OLIVETTI_SIZE) -> Tensor:
    """ORL (N, 112, 92) uint8 → Olivetti-like (N, 1, size, size) float32 in [0, 1].

    Centre-crops the 92x92 square (rows 10..101), then resizes with antialiased bilinear filtering.
    """
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    sq = images[:, top : top + side, left : left + side].float().div(255.0).unsqueeze(1)
    return F.interpolate(sq, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image about its centre, bilinear, zero background, same canvas size.

    Args:
        images: (N, C, H, W).
        degrees: (N,) angles; positive rotates counter-clockwise as displayed (row 0 at the top),
            like OpenCV's ``getRotationMatrix2D``. A square image rotated by ±90° equals
            ``torch.rot90`` exactly.

    Returns:
        (N, C, H, W).
    """
    n, _, h, w = images.shape
    if degrees.shape != (n,):
        raise ValueError(f"degrees must have shape ({n},), got {tuple(degrees.shape)}")
    a = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(a), torch.sin(a)
    # Output pixel at normalised (u, v) (v downwards) samples the input at R(a)-rotated coordinates;
    # the aspect factors keep the rotation Euclidean in pixel units for non-square images.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def centre_crop(images: Tensor, size: int = CROP) -> Tensor:
    """Crop (N, C, H, W) to (N, C, size, size) as the paper's ``crop_around_center``
    (start index ``int(H/2 - size/2)``)."""
    h, w = images.shape[-2:]
    top, left = int(int(h * 0.5) - size * 0.5), int(int(w * 0.5) - size * 0.5)
    return images[..., top : top + size, left : left + size]


@dataclass
class RotatedFaces:
    """Rotated face images with their angles.

    Attributes:
        images: (N, 1, 45, 45) float in [0, 1].
        angles: (N,) rotation in degrees, U[-90, 90].
        subject: (N,) int64 person id 0..39.
        image_index: (N,) int64 which of the person's 10 photos (1..10).
    """

    images: Tensor
    angles: Tensor
    subject: Tensor
    image_index: Tensor


def rotated_faces(
    root: str | os.PathLike[str] | None = None,
    n_rotations: int = 30,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> RotatedFaces:
    """Every ORL face rotated ``n_rotations`` times by U[-90°, 90°] angles (N = 400·n_rotations).

    Ordering follows the paper: rotation-major (all 400 faces for the first angle draw, then the
    next). Returns a :class:`RotatedFaces`.
    """
    raw, subject, index = load_orl(root)
    base = olivetti_like(raw)
    g = torch.Generator().manual_seed(int(seed))
    n = base.shape[0]
    degrees = 180.0 * torch.rand(n_rotations, n, generator=g, dtype=torch.float64) - 90.0
    out = torch.empty(n_rotations * n, 1, CROP, CROP, dtype=dtype)
    for r in range(n_rotations):
        out[r * n : (r + 1) * n] = centre_crop(rotate(base, degrees[r].float())).to(dtype)
    return RotatedFaces(
        images=out,
        angles=degrees.reshape(-1).to(dtype),
        subject=subject.repeat(n_rotations),
        image_index=index.repeat(n_rotations),
    )


def split_proportion(n: int, proportion: float, seed: int) -> tuple[Tensor, Tensor]:
    """Random (labelled, held-out) index split of n items with ``int(proportion·n)`` labelled."""
    if not 0.0 < proportion < 1.0:
        raise ValueError(f"proportion must be in (0, 1), got {proportion}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    k = int(proportion * n)
    return perm[:k].clone(), perm[k:].clone()


def faces_transfer(
    proportion: float = 0.5,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    n_rotations: int = 30,
    n_source_subjects: int = 20,
    faces: RotatedFaces | None = None,
) -> dict[str, Tensor | float]:
    """The paper's split: source people, target people; a proportion of the target images labelled.

    People are split by a seeded permutation of the 40 subjects; within the target people a
    proportion of the images (at random, as the paper) is labelled, the rest is the test set.
    Angles are standardised with the source set's mean and std.

    Args:
        proportion: fraction p of the target images that are labelled (paper: 0.1, 0.25, 0.5).
        seed: fixes the rotations' angles (unless ``faces`` is given), the people and the split.
        faces: precomputed :func:`rotated_faces` (to reuse across proportions).

    Returns:
        dict with ``x_source`` (Ns, 1, 45, 45), ``y_source`` (Ns,), ``x_target`` / ``y_target`` (the
        labelled target images), ``x_test`` / ``y_test``, ``subject_test`` (person ids),
        ``source_subjects`` / ``target_subjects`` (20,) and floats ``angle_mean``, ``angle_std``
        (degrees; an RMSE on standardised angles times ``angle_std`` is in degrees).
    """
    if faces is None:
        faces = rotated_faces(root, n_rotations=n_rotations, seed=seed)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    people = torch.randperm(40, generator=g)
    src_people, tgt_people = people[:n_source_subjects], people[n_source_subjects:]
    is_src = torch.isin(faces.subject, src_people)
    src_idx = torch.nonzero(is_src).squeeze(1)
    tgt_idx = torch.nonzero(~is_src).squeeze(1)
    ang = faces.angles
    mean, std = ang[src_idx].double().mean().item(), ang[src_idx].double().std().item()
    lab, test = split_proportion(tgt_idx.numel(), proportion, seed)
    lab, test = tgt_idx[lab], tgt_idx[test]
    z = (ang - mean) / std
    return {
        "x_source": faces.images[src_idx],
        "y_source": z[src_idx],
        "x_target": faces.images[lab],
        "y_target": z[lab],
        "x_test": faces.images[test],
        "y_test": z[test],
        "subject_test": faces.subject[test],
        "source_subjects": src_people,
        "target_subjects": tgt_people,
        "angle_mean": mean,
        "angle_std": std,
    }
