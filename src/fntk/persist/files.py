"""Writing files so that nothing is ever half-written: path checks and atomic replacement."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def check_path(path: Any, what: str = "save") -> Path:
    """``path`` (str or os.PathLike) as a Path whose folder exists and which is not a folder
    itself; TypeError for other objects (e.g. an open file), FileNotFoundError, IsADirectoryError
    or NotADirectoryError naming the path otherwise."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{what}: path must be a file name (str or os.PathLike), got {type(path).__name__}; "
            "fntk opens and writes the file itself (atomically), so pass its name, not an open file"
        )
    p = Path(os.fspath(path))
    parent = p.parent
    if not parent.exists():
        raise FileNotFoundError(
            f"{what}: the folder {str(parent)!r} of {str(p)!r} does not exist; create it first"
        )
    if not parent.is_dir():
        raise NotADirectoryError(f"{what}: {str(parent)!r} (the folder of {str(p)!r}) is not a folder")
    if p.is_dir():
        raise IsADirectoryError(f"{what}: {str(p)!r} is a folder; pass a file name inside it")
    return p


def atomic_write(path: Any, write: Callable[[IO[bytes]], None], what: str = "save") -> Path:
    """Write a file by ``write(fh)`` into a temporary file in the target's folder, flush and fsync
    it, then ``os.replace`` it onto ``path``: readers see the old file or the whole new one, never a
    part. Whatever ``write`` raises (KeyboardInterrupt included) removes the temporary file and
    leaves an existing file at ``path`` untouched. The new file gets the old file's permissions
    (default: 0o666 minus the umask). Returns the path."""
    p = check_path(path, what)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, p.stat().st_mode & 0o7777 if p.exists() else 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask



__all__ = ["check_path", "atomic_write"]
