"""Argument checks shared by the scaling rules: each names the bad value and what was expected."""

import math
import numbers


def real(name: str, value) -> float:
    """Returns ``value`` as a float; rejects bools, non-numbers, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def positive(name: str, value) -> float:
    """A finite real number > 0 (batch sizes, sample counts, timescales)."""
    value = real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def non_negative(name: str, value) -> float:
    """A finite real number >= 0 (learning rates, eps, weight decay)."""
    value = real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def decay(name: str, value) -> float:
    """An EMA decay / Adam beta in [0, 1)."""
    value = real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def kappa(base_batch, batch) -> float:
    """kappa = batch / base_batch, with both batch sizes checked to be > 0."""
    return positive("batch", batch) / positive("base_batch", base_batch)
