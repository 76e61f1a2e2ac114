"""Malaria Atlas Project Pf incidence for Kenya (``map_kenya_pf``), the paper's malaria transfer task.

The paper trains on pixels of 2012 and adapts to 2016 (Nigeria there; Kenya here, the same MAP
5 km surface). Inputs are (longitude, latitude), each rescaled to [0, 1] over the valid pixels as
the paper's ``unitize`` does (per coordinate, so the aspect ratio is not kept); the target is the
incidence rate (cases per person per year). The valid-pixel mask is the same in every year, so a
pixel index means the same place in every year.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from fntk.data.paths import data_file

MALARIA_FILE = "map_kenya_pf/kenya_pf_2000_2020.npz"


@dataclass
class MalariaYear:
    """The valid pixels of one year.

    Attributes:
        year: the year.
        x: (n, 2) (lon, lat), each scaled to [0, 1] over the valid pixels.
        y: (n,) the target variable (incidence by default).
        lonlat: (n, 2) the raw (longitude, latitude) in degrees.
        rows, cols: (n,) int64 pixel indices into the (235, 191) raster (north to south, west to
            east), to draw maps: ``img[rows, cols] = values``.
        grid_shape: (235, 191).
        extent: (lon_min, lon_max, lat_min, lat_max) of the valid pixel centres, for ``imshow``.
    """

    year: int
    x: Tensor
    y: Tensor
    lonlat: Tensor
    rows: Tensor
    cols: Tensor
    grid_shape: tuple[int, int]
    extent: tuple[float, float, float, float]

    def to_grid(self, values: Tensor) -> np.ndarray:
        """Scatter per-pixel values (n,) onto the raster; NaN outside Kenya. Returns (235, 191)."""
        values = torch.as_tensor(values).detach().reshape(-1)
        if values.numel() != self.x.shape[0]:
            raise ValueError(
                f"values must have {self.x.shape[0]} entries (one per pixel), got {values.numel()}"
            )
        img = np.full(self.grid_shape, np.nan)
        img[self.rows.numpy(), self.cols.numpy()] = values.cpu().double().numpy()
        return img


@lru_cache(maxsize=2)
def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def load_malaria_year(
    year: int,
    root: str | os.PathLike[str] | None = None,
    variable: str = "incidence",
    dtype: torch.dtype = torch.float32,
) -> MalariaYear:
    """Load one year of the Kenya MAP surface.

    Args:
        year: 2000..2020 (the paper's transfer: source 2012, target 2016).
        root: data root (else ``$FNTK_DATA``); reads ``map_kenya_pf/kenya_pf_2000_2020.npz``.
        variable: ``"incidence"`` (the paper's target) or ``"parasite_rate"``.
        dtype: floating dtype of x and y.

    Returns:
        A :class:`MalariaYear` with x (n, 2) in [0, 1] and y (n,); n = 25,049 for incidence.
    """
    d = _load(str(data_file(MALARIA_FILE, root)))
    years = [int(v) for v in d["years"]]
    if year not in years:
        raise ValueError(f"year must be one of {years[0]}..{years[-1]}, got {year}")
    if variable not in ("incidence", "parasite_rate"):
        raise ValueError(f"variable must be 'incidence' or 'parasite_rate', got {variable!r}")
    # One mask for every year of a variable (the README: the same valid pixels each year).
    mask = ~np.isnan(d[variable]).any(axis=0)
    rows, cols = np.nonzero(mask)
    lon = d["lon"][cols]
    lat = d["lat"][rows]
    z = d[variable][years.index(year)][rows, cols].astype(np.float64)
    lonlat = np.stack([lon, lat], axis=1)
    lo, hi = lonlat.min(axis=0), lonlat.max(axis=0)
    x = (lonlat - lo) / (hi - lo)
    return MalariaYear(
        year=year,
        x=torch.from_numpy(x).to(dtype),
        y=torch.from_numpy(z).to(dtype),
        lonlat=torch.from_numpy(lonlat),
        rows=torch.from_numpy(rows).long(),
        cols=torch.from_numpy(cols).long(),
        grid_shape=tuple(mask.shape),
        extent=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])),
    )


def train_test_pixels(n_pixels: int, n_train: int, n_test: int, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint random pixel subsets for one seed.

    The test set is the first ``n_test`` entries of a seeded permutation and the training set the
    next ``n_train``, so for a fixed seed the test set does not depend on ``n_train`` and the
    training sets for growing ``n_train`` are nested.

    Returns:
        ``(train_idx (n_train,), test_idx (n_test,))``, int64.
    """
    if n_train < 0 or n_test < 0 or n_train + n_test > n_pixels:
        raise ValueError(f"need 0 <= n_train + n_test <= n_pixels={n_pixels}, got {n_train} + {n_test}")
    perm = torch.randperm(n_pixels, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_test : n_test + n_train].clone(), perm[:n_test].clone()


def malaria_transfer(
    n_target: int,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    source_year: int = 2012,
    target_year: int = 2016,
    n_source: int = 2000,
    n_test: int = 5000,
    variable: str = "incidence",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor | MalariaYear]:
    """The paper's split: ``n_source`` source-year pixels; ``n_target`` and ``n_test`` disjoint
    target-year pixels.

    The source pixels are drawn with ``seed`` from the source year; the target/test pixels with
    :func:`train_test_pixels` (same seed), so the test set is shared across ``n_target``.

    Returns:
        dict with ``x_source`` (n_source, 2), ``y_source`` (n_source,), ``x_target``
        (n_target, 2), ``y_target`` (n_target,), ``x_test`` (n_test, 2), ``y_test`` (n_test,),
        ``test_idx`` (n_test,) pixel indices, and the full years ``source`` / ``target``
        (:class:`MalariaYear`, for maps).
    """
    src = load_malaria_year(source_year, root, variable, dtype)
    tgt = load_malaria_year(target_year, root, variable, dtype)
    g = torch.Generator().manual_seed(int(seed) + 1_000_003)
    if n_source > src.x.shape[0]:
        raise ValueError(f"n_source={n_source} exceeds the {src.x.shape[0]} pixels")
    s_idx = torch.randperm(src.x.shape[0], generator=g)[:n_source]
    t_idx, test_idx = train_test_pixels(tgt.x.shape[0], n_target, n_test, seed)
    return {
        "x_source": src.x[s_idx],
        "y_source": src.y[s_idx],
        "x_target": tgt.x[t_idx],
        "y_target": tgt.y[t_idx],
        "x_test": tgt.x[test_idx],
        "y_test": tgt.y[test_idx],
        "test_idx": test_idx,
        "source": src,
        "target": tgt,
    }
