"""User callbacks for the fit loops (progress, early stop by raising, e.g. KeyboardInterrupt)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Callback = Callable[[dict], None]


def check_callback(callback: Any) -> Callback | None:
    """``callback`` itself if it is callable or None; TypeError otherwise."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    return callback


def observe(objective: Callable[..., Any], callback: Callback | None) -> Callable[..., Any]:
    """Wrap a marginal-likelihood objective so that ``callback`` sees every evaluation.

    The callback receives ``{"step": i, "log_marginal_likelihood": (k',) tensor (detached)}``
    after evaluation i (0, 1, ...) of the hyperparameter search; whatever it raises propagates.
    """
    if callback is None:
        return objective
    step = [0]

    def wrapped(*args: Any) -> Any:
        out = objective(*args)
        callback({"step": step[0], "log_marginal_likelihood": out[0].detach()})
        step[0] += 1
        return out

    return wrapped
