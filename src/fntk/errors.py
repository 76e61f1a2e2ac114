"""fntk's exceptions and warnings, public from one place (re-exported by :mod:`fntk`)."""

from __future__ import annotations

from linear_operator.utils.warnings import NumericalWarning as _LONumericalWarning


class NotFittedError(ValueError, AttributeError):
    """Raised when predicting with an estimator that has not been fitted."""


class NumericalWarning(_LONumericalWarning):
    """A computation needed a numerical repair (jitter, fallback solve); the message says which.

    A subclass of linear_operator's ``NumericalWarning`` (itself a ``RuntimeWarning``)."""


class NTKMemoryError(MemoryError, ValueError):
    """The kernel (or the smallest working set of a method) does not fit the memory budget."""


class TimeLimitError(ValueError):
    """A fit's estimated time (by fntk's own cost model) exceeds the estimator's ``time_limit``;
    the message gives the estimate and how to lift the limit."""


__all__ = ["NotFittedError", "NumericalWarning", "NTKMemoryError", "TimeLimitError"]
