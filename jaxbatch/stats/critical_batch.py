"""Critical batch size from (batch, steps, examples) measured at a fixed target loss."""

from typing import NamedTuple

import numpy as np


class CriticalBatchFit(NamedTuple):
    """Result of ``fit_critical_batch``; every ``*_stderr`` is one standard error.

    ``b_crit`` = E_min / S_min is also the B_noise of S = S_min (1 + B_noise / B).
    ``residual_std`` is the RMS relative misfit 1 - S_min/S - E_min/E over the points
    (0 for data exactly on the model), with n - 2 degrees of freedom.
    """

    b_crit: float
    b_crit_stderr: float
    s_min: float
    s_min_stderr: float
    e_min: float
    e_min_stderr: float
    residual_std: float
    num_points: int

    def steps(self, batch):
        """Predicted steps to the target loss: S(B) = S_min (1 + B_crit / B)."""
        return self.s_min * (1.0 + self.b_crit / np.asarray(batch, np.float64))

    def examples(self, batch):
        """Predicted examples to the target loss: E(B) = E_min (1 + B / B_crit)."""
        return self.e_min * (1.0 + np.asarray(batch, np.float64) / self.b_crit)


def _positive_vector(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    bad = ~(np.isfinite(arr) & (arr > 0))
    if bad.any():
        raise ValueError(f"{name} must be finite and > 0, got {arr[bad].tolist()} in {name}")
    return arr


def fit_critical_batch(batch_sizes, steps, examples=None) -> CriticalBatchFit:
    """Fits S_min, E_min and B_crit = E_min / S_min with standard errors.

    The paper's model for the steps S and examples E needed to reach a fixed loss at batch B::

      S = S_min (1 + B_noise / B),   E = E_min (1 + B / B_noise)        (E = B S)
      equivalently (S / S_min - 1)(E / E_min - 1) = 1,   B_crit = E_min / S_min

    Dividing the hyperbola by S E gives an equation linear in the unknowns::

      S_min / S_i + E_min / E_i = 1        for each run i

    which is solved by least squares. Its residual 1 - S_min/S_i - E_min/E_i is the *relative*
    misfit of S_i (when E_i = B_i S_i), so runs at small and large batches weigh equally, as they
    should when step counts carry a roughly constant relative error. Standard errors come from the
    least-squares covariance sigma^2 (X^T X)^-1, sigma^2 = RSS / (n - 2), propagated to
    B_crit = E_min / S_min to first order (delta method).

    References:
      McCandlish, Kaplan, Amodei et al., 2018, "An Empirical Model of Large-Batch Training",
      Eq. 2.11 ((S/S_min - 1)(E/E_min - 1) = 1) and the critical batch B_crit = E_min / S_min.

    Args:
      batch_sizes: batch size B_i of each run (> 0), at least 3 runs and 2 distinct sizes.
      steps: steps S_i each run took to reach the target loss (> 0).
      examples: examples E_i each run consumed (> 0); defaults to B_i * S_i. Pass it when the
        batch size changed within a run so that E_i != B_i * S_i.

    Returns:
      ``CriticalBatchFit``.

    Examples:
      >>> fit = fit_critical_batch([64, 256, 1024], [1500, 750, 562.5])
      >>> round(fit.b_crit, 6), round(fit.s_min, 6)
      (128.0, 500.0)
    """
    b = _positive_vector("batch_sizes", batch_sizes)
    s = _positive_vector("steps", steps)
    e = None if examples is None else _positive_vector("examples", examples)
    if not len(b) == len(s) == (len(b) if e is None else len(e)):
        raise ValueError(
            f"batch_sizes, steps and examples must have the same length, got {len(b)}, "
            f"{len(s)} and {len(b) if e is None else len(e)}"
        )
    if e is None:
        e = b * s
    if len(b) < 3:
        raise ValueError(f"need at least 3 runs to fit 2 parameters with an error, got {len(b)}")

    # Columns rescaled to O(1) so that S ~ 1e3 and E ~ 1e7 do not ruin the conditioning.
    scale = np.array([np.median(s), np.median(e)])
    x = np.stack([1.0 / s, 1.0 / e], axis=1) * scale
    if np.linalg.matrix_rank(x) < 2:
        raise ValueError(
            "the runs do not constrain S_min and E_min separately: they need at least two "
            f"different ratios E/S (batch sizes), got batch_sizes={b.tolist()}"
        )
    theta_scaled, *_ = np.linalg.lstsq(x, np.ones(len(b)), rcond=None)
    s_min, e_min = theta_scaled * scale
    if s_min <= 0 or e_min <= 0:
        raise ValueError(
            f"the fit gives S_min={s_min:g}, E_min={e_min:g}; both must be > 0. The runs do not "
            "follow S = S_min (1 + B_noise / B): check that every run reached the same loss"
        )
    residuals = 1.0 - x @ theta_scaled
    dof = len(b) - 2
    sigma2 = float(residuals @ residuals) / dof
    cov = sigma2 * np.linalg.inv(x.T @ x) * np.outer(scale, scale)
    b_crit = e_min / s_min
    grad = np.array([-e_min / s_min**2, 1.0 / s_min])
    return CriticalBatchFit(
        b_crit=float(b_crit),
        b_crit_stderr=float(np.sqrt(max(grad @ cov @ grad, 0.0))),
        s_min=float(s_min),
        s_min_stderr=float(np.sqrt(cov[0, 0])),
        e_min=float(e_min),
        e_min_stderr=float(np.sqrt(cov[1, 1])),
        residual_std=float(np.sqrt(sigma2)),
        num_points=len(b),
    )
