"""Argument checks shared by the estimators: clear errors naming the argument and what came."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Callback = Callable[[dict], None]


def choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``valid``, else a ValueError listing them."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int ≥ 1 (bools refused), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_callback(callback: Any) -> Callback | None:
    """``callback`` itself if it is callable or None; TypeError otherwise."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    return callback


__all__ = ["Callback", "choice", "positive_int", "check_callback"]
