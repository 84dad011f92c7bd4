"""The EMA scaling rule: an EMA decay tuned at one batch size, carried to another."""

from typing import Any

from jaxbatch import _validate


def ema_decay(base_decay: float, base_batch: float, batch: float) -> float:
    """Per-step EMA decay for ``batch`` that matches ``base_decay`` at ``base_batch``.

    One step at batch kappa*B sees the data of kappa steps at batch B, so the decay per step is
    raised to the power kappa = batch / base_batch::

      rho(batch) = base_decay ** kappa

    ``jaxbatch.optim.ema_decay`` is the same rule for optimizer arguments (arrays, a half-life
    in samples); both compute it with :func:`_scaled_decay`.

    References:
      Busbridge et al., 2023, "How to Scale Your EMA", the EMA Scaling Rule (rho_hat = rho^kappa).

    Args:
      base_decay: decay tuned at ``base_batch``, in [0, 1).
      base_batch: the reference batch size (> 0).
      batch: the new batch size (> 0).

    Returns:
      The decay for ``batch``, in [0, 1).

    Examples:
      >>> round(ema_decay(0.99, 256, 1024), 6)
      0.960596
    """
    base_decay = _validate.decay("base_decay", base_decay)
    batch = _validate.positive("batch", batch)
    base_batch = _validate.positive("base_batch", base_batch)
    return _scaled_decay(base_decay, base_batch, batch)


def _scaled_decay(decay: Any, base_batch: Any, batch: Any) -> Any:
    """rho^(batch / base_batch) on checked floats or arrays (traced ones too).

    A half-life of H samples is the rule with decay 0.5 at base_batch H: the weight of a sample
    halves every H samples at any batch.
    """
    return decay ** (batch / base_batch)
