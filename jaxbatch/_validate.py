"""Argument checks for the whole package: each error names the argument, the value received and
what was expected ("batch must be > 0, got 0", "b1 must be in [0, 1), got 1.0").

Two kinds of caller, one interval test and one message format:

- host-side functions of Python numbers (the ``jaxbatch.scaling`` rules, script settings) use
  ``real``, ``positive``, ``non_negative``, ``decay`` and ``kappa``: they reject anything that is
  not a finite real number (bools, strings, None, NaN, infinities) and return it as a float.
- factories whose hyper-parameters may be schedules or arrays (the ``jaxbatch.optim``
  transforms) use ``check_range``, ``check_positive``, ``check_non_negative`` and
  ``check_decay``: they check a concrete value and let schedules and traced values through.
  Under ``optax.inject_hyperparams`` the hyper-parameters arrive as traced arrays inside
  ``update``, and a check there would force a host sync; they were already checked,
  concretely, when ``init`` ran.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np


def concrete_float(value: Any) -> float | None:
    """Returns ``value`` as a float, or None when it is traced, a schedule, or not a scalar."""
    if value is None or callable(value):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        array = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array)


def _expected(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """'> 0', '>= 0', '<= 1', 'in [0, 1)': the interval in the words of an error message."""
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}" if low is not None else "a number"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError if a concrete ``value`` lies outside the interval [low, high].

    ``low_open`` / ``high_open`` exclude the end points. Traced values and schedules are not
    checked (see the module docstring). NaN is always rejected.
    """
    v = concrete_float(value)
    if v is None:
        return
    bad = math.isnan(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        expected = _expected(low, high, low_open, high_open)
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_non_negative(name: str, value: Any) -> None:
    """Raises ValueError if a concrete ``value`` is negative (or NaN)."""
    check_range(name, value, low=0.0)


def check_positive(name: str, value: Any) -> None:
    """Raises ValueError if a concrete ``value`` is not strictly positive."""
    check_range(name, value, low=0.0, low_open=True)


def check_decay(name: str, value: Any) -> None:
    """Raises ValueError if a concrete decay rate is outside [0, 1) (1 would never move)."""
    check_range(name, value, low=0.0, high=1.0, high_open=True)


def real(name: str, value: Any) -> float:
    """Returns ``value`` as a float; rejects bools, non-numbers, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def positive(name: str, value: Any) -> float:
    """A finite real number > 0 (batch sizes, sample counts, timescales), as a float."""
    result = real(name, value)
    check_positive(name, value)
    return result


def non_negative(name: str, value: Any) -> float:
    """A finite real number >= 0 (learning rates, eps, weight decay), as a float."""
    result = real(name, value)
    check_non_negative(name, value)
    return result


def decay(name: str, value: Any) -> float:
    """An EMA decay or Adam beta in [0, 1), as a float."""
    result = real(name, value)
    check_decay(name, value)
    return result


def kappa(base_batch: Any, batch: Any) -> float:
    """kappa = batch / base_batch, with both batch sizes checked to be finite and > 0."""
    return positive("batch", batch) / positive("base_batch", base_batch)


def require_params(params: Any, transform: str) -> None:
    """Raises ValueError when a transform that reads the parameters is called without them."""
    if params is None:
        raise ValueError(
            f"{transform}.update needs the current params: call update(u, state, params)"
        )
