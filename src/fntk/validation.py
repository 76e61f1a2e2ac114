"""Checks and guards shared by the estimators (NTKRegressor, LinearizedClassifier): argument checks
that name the argument, what was expected and what came; transactional fits; cost-limit messages;
optional progress bars (over iterations, :func:`progress`; over batches, :func:`progress_bar`).
Imports nothing of fntk (the exceptions of the cost guards are raised by the callers, from
:mod:`fntk.errors`).

Type mistakes (a string where a number belongs, ``None`` for a seed) raise ``TypeError``; values
of the right type outside their range raise ``ValueError``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

Callback = Callable[[dict], None]
T = TypeVar("T")


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``valid``, else a ValueError listing them."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
    return value


def _integer(name: str, value: Any, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {_got(value)}")
    return int(value)


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer ≥ ``minimum`` (bools refused)."""
    expected = "a positive int" if minimum == 1 else f"an int ≥ {minimum}"
    v = _integer(name, value, expected)
    if v < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return v


def seed(name: str, value: Any) -> int:
    """A random seed: an int ≥ 0 (``None`` refused: fntk's draws are always reproducible)."""
    v = _integer(name, value, "an int ≥ 0 (fntk's random draws are always seeded)")
    if v < 0:
        raise ValueError(f"{name} must be an int ≥ 0, got {value!r}")
    return v


def real(name: str, value: Any, *, positive: bool = False, below: float | None = None,
         allow_none: bool = False) -> float | None:
    """``value`` as a finite float (> 0 with ``positive``, < ``below`` if given); ``None`` passes
    with ``allow_none``. Strings, bools and tensors are refused with a TypeError."""
    if value is None and allow_none:
        return None
    what = "a positive finite float" if positive else "a finite float"
    if below is not None:
        what += f" below {below:g}"
    if allow_none:
        what += " or None"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {_got(value)}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0) or (below is not None and v >= below):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def byte_count(name: str, value: Any) -> int | None:
    """A memory size in bytes: a positive int, or None (the default). Strings such as "4GB" are
    refused with the int to pass instead."""
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(
            f"{name} must be a number of bytes as an int (e.g. 4 * 1024**3 for 4 GiB) or None, "
            f"got the string {value!r}"
        )
    return positive_int(name, value)


def seconds_limit(name: str, value: Any) -> float | None:
    """A time limit in seconds: a positive float, or None (no limit)."""
    return real(name, value, positive=True, allow_none=True)


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}")
    return value


def check_callback(callback: Any) -> Callback | None:
    """``callback`` itself if it is callable or None; TypeError otherwise."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    return callback


def check_options(name: str, options: Any, checks: dict[str, Callable[[str, Any], Any]]) -> dict:
    """A copy of the dict ``options`` with every entry checked by ``checks[key](f"{name}[{key!r}]",
    value)`` (which returns the checked value); unknown keys and non-dicts are refused."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict or None, got {type(options).__name__}")
    unknown = sorted(map(str, set(options) - set(checks)))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; valid keys: {tuple(checks)}")
    return {k: checks[k](f"{name}[{k!r}]", v) for k, v in options.items()}


# ------------------------------------------------------------------------------ transactional fits
@contextlib.contextmanager
def transaction(obj: Any) -> Iterator[None]:
    """Run the block; if it raises anything (KeyboardInterrupt included), restore every attribute
    of ``obj`` to what it was before (attributes added are removed, replaced ones put back).

    A fit builds its new state in fresh objects and assigns it to ``obj`` at the end, so restoring
    the attribute dictionary undoes everything a failed or interrupted fit did to ``obj``."""
    saved = dict(vars(obj))
    try:
        yield
    except BaseException:
        vars(obj).clear()
        vars(obj).update(saved)
        raise


# ------------------------------------------------------------------------------------ cost guards
def format_seconds(s: float) -> str:
    """A duration for messages: '42 s', '3.1 min', '5.2 h', '7.7 days'."""
    if not math.isfinite(s):
        return "an unbounded time"
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.3g} min"
    if s < 172800:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} days"


def format_bytes(n: float) -> str:
    """A size for messages: '512 B', '3.2 KiB', '41 MiB', '7.5 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def over_time(what: str, estimate: float, limit: float | None, hint: str = "") -> str | None:
    """The message of a refused fit when ``estimate`` seconds exceed ``limit`` (else None)."""
    if limit is None or estimate <= limit:
        return None
    return (
        f"{what} is estimated at {format_seconds(estimate)} by fntk's cost model, above "
        f"time_limit={limit:g} s ({format_seconds(limit)}); pass time_limit=None (or more seconds) to "
        f"run it anyway{', or ' + hint if hint else ''}"
    )


def over_memory(what: str, nbytes: float, budget: int, option: str, hint: str = "") -> str | None:
    """The message of a refused allocation of ``nbytes`` above ``budget`` (else None)."""
    if nbytes <= budget:
        return None
    return (
        f"{what} needs {format_bytes(nbytes)}, above the memory budget of {format_bytes(budget)} "
        f"({option}){'; ' + hint if hint else ''}"
    )


# -------------------------------------------------------------------------------------- progress
@contextlib.contextmanager
def progress(callback: Callback | None, enabled: bool, desc: str) -> Iterator[Callback | None]:
    """Yield a callback that ticks a tqdm bar (stderr) per reported iteration, then calls
    ``callback``; with ``enabled=False`` yield ``callback`` unchanged. The bar is closed on exit,
    also when the block raises."""
    if not enabled:
        yield callback
        return
    bar = tqdm(desc=desc, unit="it", leave=False)

    def tick(info: dict) -> None:
        bar.update(1)
        stage = info.get("stage")
        value = info.get("objective", info.get("log_marginal_likelihood"))
        try:
            shown = f"{float(value.sum() if hasattr(value, 'sum') else value):.6g}"
        except (TypeError, ValueError):
            shown = "?"
        bar.set_postfix_str(f"{stage + ' ' if stage else ''}{shown}", refresh=False)
        if callback is not None:
            callback(info)

    try:
        yield tick
    finally:
        bar.close()


def progress_bar(items: Iterable[T], enabled: bool, desc: str, total: int | None = None,
                 unit: str = "batch") -> Iterator[T]:
    """The items of ``items``, with a tqdm bar (stderr) ticking once per item when ``enabled`` (the
    estimators' ``progress`` option; ``total`` items when known). The bar is closed when the
    iteration ends, also when it raises or stops early."""
    if not enabled:
        yield from items
        return
    bar = tqdm(desc=desc, unit=unit, total=total, leave=False)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


__all__ = [
    "Callback",
    "choice",
    "positive_int",
    "seed",
    "real",
    "byte_count",
    "seconds_limit",
    "flag",
    "check_callback",
    "check_options",
    "transaction",
    "format_seconds",
    "format_bytes",
    "over_time",
    "over_memory",
    "progress",
    "progress_bar",
]
