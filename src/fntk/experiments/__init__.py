"""The paper's experiments, reproduced and extended. Each module has ``run(cfg) -> dict``.

Only :mod:`fntk.cli` imports this package. Modules are imported lazily by name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: name → module path. Each module defines ``run(cfg: RunConfig) -> dict``.
EXPERIMENTS = {
    "sine": "fntk.experiments.sine",
    "malaria": "fntk.experiments.malaria",
    "faces": "fntk.experiments.faces",
    "digits": "fntk.experiments.digits",
    "linearity": "fntk.experiments.linearity",
    "speed": "fntk.experiments.speed",
    "unsup": "fntk.experiments.unsup",
}


def load(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])
