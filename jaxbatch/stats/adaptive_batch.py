"""The next batch size of an adaptive-batch schedule, from the norm test (AdAdaGrad)."""

from __future__ import annotations

import math
import numbers

import numpy as np


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _finite_float(name: str, value) -> float:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a real number, got {value!r}") from e
    if array.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {array.shape}")
    return float(array)


def norm_test_batch_size(
    trace_sigma,
    grad_sq_norm,
    batch_size: int,
    *,
    max_batch_size: int,
    eta: float = 0.1,
    granularity: int = 1,
) -> int:
    """The batch size of the next steps by the norm test; it only ever grows.

    The norm test asks that the batch gradient g_B points along the true gradient G, in the sense
    E|g_B - G|^2 <= eta^2 |G|^2. With E|g_B - G|^2 = tr(Sigma) / B (Sigma the per-example gradient
    covariance) and |G|^2 replaced by its sample value |g_B|^2, the smallest batch that passes is::

      B_test = ceil( tr(Sigma_hat) / (eta^2 |g_B|^2) )
      B_next = min(B_max, round_up(max(B, B_test), granularity))

    so the batch grows when the test fails (B_test > B) and stays otherwise. ``B_test`` is the
    gradient noise scale tr(Sigma)/|g_B|^2 divided by eta^2 (McCandlish et al. 2018, B_simple with
    the biased |g_B|^2 in the denominator). Rounding up to a multiple of ``granularity`` (the
    micro-batch of a trainer with a fixed micro-batch shape) keeps the number of compiled step
    shapes small. When the statistics carry no information (|g_B|^2 <= 0, tr(Sigma_hat) <= 0, or a
    non-finite value, as a one-step two-batch estimate can be), the batch is kept.

    References:
      Lau, Liu, Kolar, 2024, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
      Methods", Sec. 3 (the norm test and its batch-size rule, eta = 0.1 in their experiments);
      Byrd, Chin, Nocedal, Wu, 2012, "Sample size selection in optimization methods for machine
      learning", Eq. 3.9 (the norm test).

    Args:
      trace_sigma: tr(Sigma_hat), the trace of the per-example gradient covariance (e.g. the
        ``trace`` of ``noise_scale_from_two_batches``, or its EMA).
      grad_sq_norm: |g_B|^2, the squared norm of the current batch gradient (e.g.
        ``GradNoiseStats.sq_norm_big``).
      batch_size: B, the current batch size (a positive int).
      max_batch_size: B_max, the largest batch allowed; a multiple of ``granularity`` and
        >= ``batch_size``.
      eta: the test's tolerance (> 0); smaller eta grows the batch faster.
      granularity: every batch returned is a multiple of it (>= 1).

    Returns:
      The next batch size, a Python int with batch_size <= result <= max_batch_size.

    Examples:
      >>> norm_test_batch_size(2.0, 0.5, 64, max_batch_size=4096, granularity=32)
      416
      >>> norm_test_batch_size(2.0, 0.5, 512, max_batch_size=4096, granularity=32)
      512
    """
    batch = _positive_int("batch_size", batch_size)
    limit = _positive_int("max_batch_size", max_batch_size)
    step = _positive_int("granularity", granularity)
    eta = _finite_float("eta", eta)
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta!r}")
    if limit % step:
        raise ValueError(
            f"max_batch_size={limit} is not a multiple of granularity={step}; the schedule could "
            "not reach it"
        )
    if batch > limit:
        raise ValueError(f"batch_size={batch} is larger than max_batch_size={limit}")
    trace = _finite_float("trace_sigma", trace_sigma)
    g2 = _finite_float("grad_sq_norm", grad_sq_norm)
    if not (math.isfinite(trace) and math.isfinite(g2) and trace > 0 and g2 > 0):
        return batch
    wanted = trace / (eta * eta * g2)
    if wanted <= batch:
        return batch
    if wanted >= limit:  # also keeps ceil() away from huge floats
        return limit
    wanted = math.ceil(wanted)
    return min(limit, -(-wanted // step) * step)
