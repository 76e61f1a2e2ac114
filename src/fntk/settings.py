"""Process-wide settings: the working-memory budget of batched products, and the machine's RAM."""

from __future__ import annotations

#: Default working-memory budget (bytes) of one batched product or Jacobian chunk. Override per
#: object (``Linearized(..., memory_budget=...)``) or globally with :func:`set_memory_budget`.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3
_memory_budget = DEFAULT_MEMORY_BUDGET


def set_memory_budget(nbytes: int) -> None:
    """Set the module-wide default working-memory budget in bytes (used when an object has none)."""
    global _memory_budget
    if isinstance(nbytes, bool) or not (isinstance(nbytes, int) and nbytes > 0):
        raise ValueError(f"memory budget must be a positive int of bytes, got {nbytes!r}")
    _memory_budget = nbytes


def get_memory_budget() -> int:
    """The module-wide default working-memory budget in bytes."""
    return _memory_budget


def available_memory() -> int:
    """Bytes of available RAM (Linux /proc/meminfo), else 8 GiB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    return 8 * 1024**3


__all__ = ["DEFAULT_MEMORY_BUDGET", "set_memory_budget", "get_memory_budget", "available_memory"]
